"""LightningCLI over RewardModelModule and PreferenceDataModule.

    python -m l3m_lightning.reward_cli fit --config configs/rm-harmless.yaml
    python -m l3m_lightning.reward_cli validate --config configs/rm-harmless.yaml --ckpt_path <ckpt>

The trained RM is exported with ``save_pretrained`` to ``<log dir>/hf_model`` (``model.export_dir``),
ready for ``{name: reward_model, model_name_or_path: <that folder>, ...}``.
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from l3m_lightning.reward.data import PreferenceDataModule
from l3m_lightning.reward.module import RewardModelModule


def _tokenizer_for_data(model_name_or_path: str, tokenizer_name_or_path: str | None) -> str:
    return tokenizer_name_or_path or model_name_or_path


class RewardModelCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The pairs are tokenised with the RM's tokenizer: one setting, not two to keep in sync.
        parser.link_arguments(
            ("model.model_name_or_path", "model.tokenizer_name_or_path"),
            "data.tokenizer",
            compute_fn=_tokenizer_for_data,
        )


def main(args: list[str] | None = None) -> RewardModelCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return RewardModelCLI(
        RewardModelModule,
        PreferenceDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
