"""LightningCLI over L3MModule and ChatDataModule: ``python cli.py fit --config configs/quickstart.yaml``.

``python cli.py rm fit --config configs/rm-harmless.yaml`` trains a reward model instead.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from l3m_lightning.data import ChatDataModule
from l3m_lightning.module import L3MModule


def _tokenizer_for_data(model_name_or_path: str, tokenizer_name_or_path: str | None) -> str:
    return tokenizer_name_or_path or model_name_or_path


class TokenizerLinkedCLI(LightningCLI):
    """A LightningCLI whose ``data.tokenizer`` is the model's (policy or reward model) tokenizer."""

    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenised with the model's tokenizer: one setting, not two to keep in sync.
        parser.link_arguments(
            ("model.model_name_or_path", "model.tokenizer_name_or_path"),
            "data.tokenizer",
            compute_fn=_tokenizer_for_data,
        )


def main(args: list[str] | None = None):
    """``cli.py {fit,validate,test,predict} ...`` trains the policy; ``cli.py rm fit ...`` trains a reward model."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(signal, "SIGUSR2"):  # `kill -USR2 <pid>` prints every thread's stack: where a stuck run waits
        faulthandler.register(signal.SIGUSR2, all_threads=True)
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["rm"]:
        from l3m_lightning.reward_cli import main as reward_model_main

        # sys.argv keeps "rm" so that DDP's re-launched processes take this branch too
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            return reward_model_main(argv[1:])
    return TokenizerLinkedCLI(
        L3MModule,
        ChatDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
