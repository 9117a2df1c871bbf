"""LightningCLI over L3MModule and ChatDataModule: ``python cli.py fit --config configs/quickstart.yaml``.

``python cli.py rm fit --config configs/rm-harmless.yaml`` trains a reward model instead.
A mistake in the config or the data is one ``error:`` line and exit status 2; a bug keeps its
traceback; ``L3M_DEBUG=1`` always shows it (the rule: ``l3m_lightning.errors``). The CLI class
both commands share is ``l3m_lightning.cli_base``.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import warnings

from l3m_lightning.cli_base import TokenizerLinkedCLI, run_cli
from l3m_lightning.errors import report_errors
from l3m_lightning.options import check_moved_keys
from l3m_lightning.data import ChatDataModule
from l3m_lightning.module import L3MModule

__all__ = ["TokenizerLinkedCLI", "main"]


def main(args: list[str] | None = None):
    """``cli.py {fit,validate,test,predict} ...`` trains the policy; ``cli.py rm fit ...`` trains a reward model."""
    if hasattr(signal, "SIGUSR2"):  # `kill -USR2 <pid>` prints every thread's stack: where a stuck run waits
        faulthandler.register(signal.SIGUSR2, all_threads=True)
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["rm"]:
        from l3m_lightning.reward_cli import main as reward_model_main

        # sys.argv keeps "rm" so that DDP's re-launched processes take this branch too
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            return reward_model_main(argv[1:])
    report_errors(lambda: check_moved_keys(argv))  # an old flat key (model.mu_floor) fails naming its new place
    return run_cli(L3MModule, ChatDataModule, args)
