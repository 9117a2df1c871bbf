"""LightningCLI over L3MModule and ChatDataModule: ``python cli.py fit --config configs/quickstart.yaml``.

``python cli.py rm fit --config configs/rm-harmless.yaml`` trains a reward model instead.
A mistake in the config or the data is one ``error:`` line and exit status 2; a bug keeps its
traceback; ``L3M_DEBUG=1`` always shows it (the rule: ``l3m_lightning.errors``).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import warnings

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from l3m_lightning.checkpointing import atomic_sharded_saves, resolve_last_checkpoint, with_atomic_checkpoint_io
from l3m_lightning.data import ChatDataModule
from l3m_lightning.errors import OneLineErrorParser, mark_run_phase, report_errors
from l3m_lightning.module import L3MModule
from l3m_lightning.outputs import check_ckpt_path, check_fit_outputs


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
        # ... and is allowed custom code exactly when the model's tokenizer is
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # No abbreviated options (`--model.num_sample` must not set num_samples) and one-line parse errors.
        if self.parser_class is LightningArgumentParser:
            self.parser_class = OneLineErrorParser
        return super().init_parser(**kwargs)

    def before_fit(self) -> None:
        """Output folders are checked before the data is read or a step is spent (the modules check again in on_fit_start)."""
        hparams = getattr(self.model, "hparams", {})
        export_dir = hparams.get("export_dir") if "export_dir" in hparams else ""  # "": a module that exports nothing
        check_fit_outputs(self.trainer, export_dir, self.config[self.subcommand].get("ckpt_path"))

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            check_ckpt_path(self.config[subcommand].get("ckpt_path"))
            super()._run_subcommand(subcommand)
        except BaseException as err:  # from here on only a ConfigError is a one-line error (l3m_lightning.errors)
            mark_run_phase(err)
            raise

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, writing checkpoints crash-safely (``AtomicCheckpointIO``) unless the config names its own ``CheckpointIO``."""
        config = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("plugins", with_atomic_checkpoint_io(config.get("plugins"), config.get("strategy")))
        trainer = super().instantiate_trainer(**kwargs)
        atomic_sharded_saves(trainer.strategy)  # FSDP / FSDP2 sharded checkpoints are folders, written by the strategy
        return trainer

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "last":  # an unreadable last.ckpt falls back to the newest intact checkpoint
            kwargs["ckpt_path"] = resolve_last_checkpoint(self.trainer) or "last"
        return kwargs


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
    return report_errors(lambda: TokenizerLinkedCLI(
        L3MModule,
        ChatDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    ))
