"""LightningCLI over L3MModule and ChatDataModule: ``python cli.py fit --config configs/quickstart.yaml``."""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from l3m_lightning.data import ChatDataModule
from l3m_lightning.module import L3MModule


def _tokenizer_for_data(model_name_or_path: str, tokenizer_name_or_path: str | None) -> str:
    return tokenizer_name_or_path or model_name_or_path


class L3MCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenised with the policy's tokenizer: one setting, not two to keep in sync.
        parser.link_arguments(
            ("model.model_name_or_path", "model.tokenizer_name_or_path"),
            "data.tokenizer",
            compute_fn=_tokenizer_for_data,
        )


def main(args: list[str] | None = None) -> L3MCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return L3MCLI(
        L3MModule,
        ChatDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
