"""The LightningCLI both commands build: the policy trainer (``cli.py``) and the reward-model trainer (``cli.py rm``).

``cli.py`` and ``reward_cli.py`` each import this module and neither imports the other at load time
(``cli.py rm`` imports ``reward_cli`` when it runs), so the two entry points share one CLI class and
one construction (``build_cli``) without an import cycle.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from l3m_lightning.checkpointing import atomic_sharded_saves, resolve_last_checkpoint, with_atomic_checkpoint_io
from l3m_lightning.errors import OneLineErrorParser, mark_run_phase, report_errors
from l3m_lightning.outputs import check_ckpt_path, check_fit_outputs

#: Where a model class keeps (model, tokenizer, trust_remote_code), first match wins: the policy's
#: option group (``model.policy.*``), or the flat keys of the reward-model trainer.
TOKENIZER_SOURCES = (
    ("model.policy.name_or_path", "model.policy.tokenizer_name_or_path", "model.policy.trust_remote_code"),
    ("model.model_name_or_path", "model.tokenizer_name_or_path", "model.trust_remote_code"),
)


def _tokenizer_for_data(model_name_or_path: str, tokenizer_name_or_path: str | None) -> str:
    return tokenizer_name_or_path or model_name_or_path


def _has_option(parser: Any, key: str) -> bool:
    return f"--{key}" in getattr(parser, "_option_string_actions", {})


class TokenizerLinkedCLI(LightningCLI):
    """A LightningCLI whose ``data.tokenizer`` is the model's (policy or reward model) tokenizer."""

    def add_arguments_to_parser(self, parser) -> None:
        # The data is tokenised with the model's tokenizer: one setting, not two to keep in sync.
        for model_key, tokenizer_key, trust_key in TOKENIZER_SOURCES:
            if _has_option(parser, model_key):
                parser.link_arguments((model_key, tokenizer_key), "data.tokenizer", compute_fn=_tokenizer_for_data)
                # ... and is allowed custom code exactly when the model's tokenizer is
                parser.link_arguments(trust_key, "data.trust_remote_code")
                return
        # not silently unlinked: a model whose options moved must say here where its tokenizer is
        raise TypeError(f"{self._model_class.__name__} has none of the tokenizer options {[keys[0] for keys in TOKENIZER_SOURCES]}")

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

    def _parse_ckpt_path(self) -> None:
        """Lightning re-parses a checkpoint's saved hyperparameters into the config; a model class with an
        ``upgrade_hparams`` (``L3MModule``: the flat keys of before the option groups) upgrades them first,
        so ``fit --ckpt_path`` resumes a checkpoint written by an earlier version."""
        upgrade = getattr(self._model_class, "upgrade_hparams", None)
        if upgrade is None:
            return super()._parse_ckpt_path()
        parse_object = self.parser.parse_object

        def parse_upgraded(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            for command in cfg.values():
                if isinstance(command, dict) and isinstance(command.get("model"), dict):
                    command["model"] = upgrade(command["model"])
            return parse_object(cfg, *args, **kwargs)

        self.parser.parse_object = parse_upgraded
        try:
            super()._parse_ckpt_path()
        finally:
            del self.parser.parse_object  # the parser's own method again

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "last":  # an unreadable last.ckpt falls back to the newest intact checkpoint
            kwargs["ckpt_path"] = resolve_last_checkpoint(self.trainer) or "last"
        return kwargs


def build_cli(model_class: type, datamodule_class: type, args: list[str] | None = None, **kwargs: Any) -> TokenizerLinkedCLI:
    """The CLI over ``model_class`` and ``datamodule_class`` with this project's defaults (seed 0, config saved over).

    ``kwargs`` go to ``LightningCLI`` (``run=False``, ``trainer_defaults``, ...).
    """
    kwargs.setdefault("seed_everything_default", 0)
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return TokenizerLinkedCLI(model_class, datamodule_class, args=args, **kwargs)


def run_cli(model_class: type, datamodule_class: type, args: list[str] | None = None) -> TokenizerLinkedCLI:
    """``build_cli`` as a command: a config or data mistake is one ``error:`` line, exit 2 (``l3m_lightning.errors``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return report_errors(lambda: build_cli(model_class, datamodule_class, args))
