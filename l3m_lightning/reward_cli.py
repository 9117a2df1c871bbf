"""LightningCLI over RewardModelModule and PreferenceDataModule.

    python -m l3m_lightning.reward_cli fit --config configs/rm-harmless.yaml
    python -m l3m_lightning.reward_cli validate --config configs/rm-harmless.yaml --ckpt_path <ckpt>

The trained RM is exported with ``save_pretrained`` to ``<log dir>/hf_model`` (``model.export_dir``),
ready for ``{name: reward_model, model_name_or_path: <that folder>, ...}``.
"""

from __future__ import annotations

from l3m_lightning.cli_base import TokenizerLinkedCLI, run_cli
from l3m_lightning.reward.data import PreferenceDataModule
from l3m_lightning.reward.module import RewardModelModule


def main(args: list[str] | None = None) -> TokenizerLinkedCLI:
    # a config or data mistake: one `error:` line, exit 2 (l3m_lightning.errors)
    return run_cli(RewardModelModule, PreferenceDataModule, args)


if __name__ == "__main__":
    main()
