"""Entry point: ``python cli.py {fit,validate,test,predict} --config configs/<x>.yaml``."""

from l3m_lightning.cli import main

if __name__ == "__main__":
    main()
