"""Preference pairs for reward-model training: load, validate, format like the RM constraint, tokenise, batch.

A row is one of

- ``{"prompt": str, "chosen": str, "rejected": str}``: two replies to one prompt;
- ``{"chosen": str, "rejected": str}`` holding Anthropic-HH-style dialogues
  ``"\\n\\nHuman: … \\n\\nAssistant: … \\n\\nHuman: … \\n\\nAssistant: <reply>"``: each is split into
  the prompt (everything before the final ``"\\n\\nAssistant:"``, without the leading ``"\\n\\nHuman:"``)
  and the final reply;
- ``{"chosen": str, "rejected": str}`` of plain texts, scored as they are.

(prompt, reply) pairs are formatted with ``constraints.reward_model.format_for_reward_model``, the
function the ``reward_model`` constraint scores with, so a trained RM sees the same text at
training and at constraint time. With the default HH template an HH dialogue comes out as written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from constraints.base import ConfigError
from constraints.model_source import ensure_pad_token, load_pretrained
from constraints.data_files import load_rows, load_source, pick_split
from constraints.reward_model import DEFAULT_TEMPLATE, INPUT_FORMATS, check_template, format_for_reward_model

from l3m_lightning.data import SplitsDataModule, check_split_and_batch, hold_out, pad_sequences

log = logging.getLogger(__name__)

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def split_hh_dialogue(text: str, where: str) -> tuple[str, str]:
    """``(prompt, final reply)`` of an HH dialogue; the prompt keeps the earlier turns, minus the leading ``Human:``."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ConfigError(f"{where}: HH-style dialogue has no {ASSISTANT!r} turn: {text[:120]!r}")
    prompt, reply = text[:cut], text[cut + len(ASSISTANT) :]
    if prompt.startswith(HUMAN):
        prompt = prompt[len(HUMAN) :]
    return prompt.strip(), reply.strip()


def is_hh_dialogue(text: str) -> bool:
    return text.startswith(HUMAN) or (HUMAN in text and ASSISTANT in text)


def preference_pair(
    row: dict[str, Any], index: int, prompt_column: str = "prompt", chosen_column: str = "chosen", rejected_column: str = "rejected"
) -> tuple[tuple[str | None, str], tuple[str | None, str]]:
    """Validate one row: ``((prompt, chosen reply), (prompt, rejected reply))``; prompt ``None`` for plain texts."""
    where = f"preference row {index}"
    if not isinstance(row, Mapping):
        raise ConfigError(f"{where}: expected a mapping with '{chosen_column}' and '{rejected_column}' fields, got {row!r:.120}")
    for column in (chosen_column, rejected_column):
        if column not in row:
            raise ConfigError(f"{where}: field '{column}' is missing (fields: {sorted(row)})")
        if not isinstance(row[column], str) or not row[column].strip():
            raise ConfigError(f"{where}: field '{column}' must be a non-empty string, got {row[column]!r:.120}")
    prompt = row.get(prompt_column)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ConfigError(f"{where}: field '{prompt_column}' must be a string, got {prompt!r:.120}")
        return (prompt, row[chosen_column]), (prompt, row[rejected_column])
    pairs = []
    for column in (chosen_column, rejected_column):
        text = row[column]
        pairs.append(split_hh_dialogue(text, f"{where}: field '{column}'") if is_hh_dialogue(text) else (None, text))
    if (pairs[0][0] is None) != (pairs[1][0] is None):
        raise ConfigError(f"{where}: fields '{chosen_column}' and '{rejected_column}' must both be HH-style dialogues or both plain texts")
    return pairs[0], pairs[1]


def load_preference_rows(
    dataset: str, train_split: str = "train", val_split: str | None = None, columns: tuple[str, str, str] = ("prompt", "chosen", "rejected")
) -> tuple[Dataset, Dataset | None]:
    """A local ``.json``/``.jsonl`` (optionally ``.gz``)/``.csv``/``.parquet`` file, a ``save_to_disk`` folder, or a dataset name."""
    path = Path(dataset).expanduser()
    if path.is_file():
        rows = load_rows(path, "data.dataset")
        for index, row in enumerate(rows):  # before Arrow sees them: a wrong type fails naming its row
            preference_pair(row, index, *columns)
        keep = [c for c in columns if any(c in row for row in rows)]
        return Dataset.from_list([{c: row.get(c) for c in keep} for row in rows]), None
    loaded = load_source(dataset, "data.dataset")
    if not isinstance(loaded, (DatasetDict, dict)):
        return loaded, None
    train = pick_split(loaded, train_split, dataset)
    return train, None if val_split is None else pick_split(loaded, val_split, dataset)


class PairCollator:
    """Pads chosen then rejected sequences into one ``[2B, W]`` batch (one forward pass scores both)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        features = [{k[len(side) + 1 :]: v for k, v in row.items() if k.startswith(side + "_")} for side in ("chosen", "rejected") for row in rows]
        # what tokenizer.pad pads each field with, on the tokenizer's padding side
        values = {"input_ids": self.tokenizer.pad_token_id, "token_type_ids": getattr(self.tokenizer, "pad_token_type_id", 0)}
        left = self.tokenizer.padding_side == "left"
        batch: dict[str, Any] = {key: pad_sequences([f[key] for f in features], values.get(key, 0), left) for key in features[0]}
        batch["num_pairs"] = len(rows)
        return batch


class PreferenceDataModule(SplitsDataModule):
    """Chosen/rejected preference pairs for ``RewardModelModule``.

    Args:
        dataset: a local ``.json``/``.jsonl``/``.jsonl.gz``/``.csv``/``.parquet`` file, a ``save_to_disk``
            folder, or a dataset name for ``load_dataset``.
        tokenizer: the reward model's tokenizer (the CLI links it to ``model.model_name_or_path``).
        val_split: a split name; without one, ``val_fraction`` of the rows is held out (seeded by
            ``split_seed``) and also serves as the test set.
        prompt_column / chosen_column / rejected_column: field names (see the module docstring).
        input_format / template: how (prompt, reply) becomes text; keep the ``reward_model``
            constraint's defaults (the export records them so the constraint uses the same).
        max_length: tokens per sequence; longer ones lose tokens on ``truncation_side`` (``left``
            keeps the reply).
        max_train_rows / max_val_rows: caps, applied after the split.
        trust_remote_code: allow a tokenizer folder with custom code (the CLI links it to ``model.trust_remote_code``).
    """

    def __init__(
        self,
        dataset: str,
        tokenizer: str = "",
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        max_train_rows: int | None = None,
        max_val_rows: int | None = None,
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        input_format: str = "auto",
        template: str = DEFAULT_TEMPLATE,
        max_length: int = 256,
        truncation_side: str = "left",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        check_split_and_batch(val_fraction, batch_size)
        if max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {max_length}")
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"data.input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"data.truncation_side must be 'left' or 'right', got {truncation_side!r}")
        check_template(template, "data.template")
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.splits: dict[str, Dataset] = {}

    def format_spec(self) -> dict[str, Any]:
        """What the ``reward_model`` constraint needs to format text the way this data did."""
        hp = self.hparams
        return {"input_format": hp.input_format, "template": hp.template, "max_length": hp.max_length, "truncation_side": hp.truncation_side}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from transformers import AutoTokenizer

        hp = self.hparams
        if not hp.tokenizer:
            raise ConfigError("data.tokenizer is empty: set it (the CLI links it to model.model_name_or_path)")
        self.tokenizer = load_pretrained(AutoTokenizer, hp.tokenizer, "data.tokenizer", hp.trust_remote_code)
        self.tokenizer.truncation_side = hp.truncation_side
        ensure_pad_token(self.tokenizer)
        columns = (hp.prompt_column, hp.chosen_column, hp.rejected_column)
        train, val = load_preference_rows(hp.dataset, hp.train_split, hp.val_split, columns)
        # Validate and tokenise before splitting, so an error names the row as it is in the file.
        train = self._tokenize(train, "train" if val is not None else "all")
        if val is None:
            train, val = hold_out(train, hp.val_fraction, hp.split_seed, f"data.dataset '{hp.dataset}'")
        else:
            val = self._tokenize(val, "val")
        for name, split, cap in (("train", train, hp.max_train_rows), ("val", val, hp.max_val_rows)):
            self.splits[name] = split.select(range(cap)) if cap is not None and len(split) > cap else split
        self.splits["test"] = self.splits["val"]
        log.info("preference data: %d train / %d held-out pairs", len(self.splits["train"]), len(self.splits["val"]))

    def _tokenize(self, split: Dataset, name: str) -> Dataset:
        hp, tokenizer = self.hparams, self.tokenizer

        def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for side, (prompt, reply) in zip(("chosen", "rejected"), preference_pair(row, index, hp.prompt_column, hp.chosen_column, hp.rejected_column)):
                if prompt is None:
                    text, pair, special = reply, None, True
                else:
                    text, pair, special = format_for_reward_model(tokenizer, prompt, reply, hp.input_format, hp.template)
                encoded = tokenizer(text, pair, truncation=True, max_length=hp.max_length, add_special_tokens=special)
                out.update({f"{side}_{k}": v for k, v in encoded.items()})
            return out

        if len(split) == 0:
            raise ConfigError(f"data.dataset '{hp.dataset}': the {name} split has no rows")
        return split.map(encode, with_indices=True, remove_columns=split.column_names, desc=f"tokenizing {name} pairs")

    def collate_fn(self) -> PairCollator:
        return PairCollator(self.tokenizer)


__all__ = ["PairCollator", "PreferenceDataModule", "load_preference_rows", "preference_pair", "split_hh_dialogue"]
