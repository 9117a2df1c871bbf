"""Rows from local data files, saved datasets and dataset names: the one loader of the project.

The chat data (``l3m_lightning.data``), the preference pairs (``l3m_lightning.reward.data``) and the
``reward_model`` constraint's calibration files all read through here, so a file type, a compressed
file, a bad JSON line or a missing split reads and fails the same way everywhere. It sits with the
constraints, the bottom layer, because calibration needs it; ``datasets`` is imported only when used.

* ``load_file``: a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file (optionally compressed) as a
  ``datasets.Dataset`` (Arrow: large files are fine); an empty or unreadable file is one ``ConfigError`` line.
* ``load_rows``: the same as Python dicts, JSON parsed row by row (a row of the wrong type fails
  naming its row, before Arrow would refuse the whole column).
* ``load_source``: a ``save_to_disk`` folder or a dataset name; ``pick_split``: one split of it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from constraints.base import ConfigError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
#: The local file names a data option accepts.
DATA_SUFFIXES = tuple(FILE_BUILDERS) + tuple(f"{s}.gz" for s in FILE_BUILDERS)


def _prefix(option: str | None) -> str:
    return f"{option}: " if option else ""


def file_builder(path: Path, option: str | None = None) -> str:
    """The ``datasets`` builder of a local data file (``json``, ``csv``, ``parquet``), looking through a compression suffix."""
    suffixes = [x.lower() for x in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] in COMPRESSIONS
    builder = FILE_BUILDERS.get(suffixes[-2] if compressed and len(suffixes) > 1 else (suffixes or [""])[-1])
    if builder is None:
        raise ConfigError(f"{_prefix(option)}unsupported file type {''.join(path.suffixes)!r}; expected one of {sorted(FILE_BUILDERS)}, optionally .gz")
    return builder


def open_text(path: Path) -> Any:
    """``path`` opened as text, decompressing .gz/.bz2/.xz; None for a compression we cannot read here."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if suffix in (".bz2", ".xz"):
        import bz2
        import lzma

        return (bz2 if suffix == ".bz2" else lzma).open(path, "rt", encoding="utf-8", errors="replace")
    if suffix == ".zst":
        return None
    return open(path, encoding="utf-8", errors="replace")


def first_char(path: Path) -> str | None:
    """The file's first character that is not whitespace; ``""`` for an empty file, None if it cannot be read here."""
    handle = open_text(path)
    if handle is None:
        return None
    with handle:
        while chunk := handle.read(1 << 16):
            stripped = chunk.lstrip(" \t\r\n\ufeff")
            if stripped:
                return stripped[0]
    return ""


def read_text(path: Path) -> str | None:
    """The whole (decompressed) text of a file; None for a compression we cannot read here."""
    handle = open_text(path)
    if handle is None:
        return None
    with handle:
        return handle.read()


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(1-based line number, text)`` of each line of a text file (decompressed)."""
    handle = open_text(path)
    if handle is None:
        return
    with handle:
        yield from enumerate(handle, start=1)


def innermost_message(err: BaseException) -> str:
    """The deepest cause's message on one line: ``datasets`` wraps the parser's error in a generic one."""
    for _ in range(20):  # a chain, not a cycle, but never loop forever
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    message = " ".join(str(err).split()) or type(err).__name__
    return message[:200]


def _json_line(path: Path, number: int, line: str, option: str | None) -> dict[str, Any]:
    """One line of a JSON-lines file as an object; anything else is one ``ConfigError`` line naming the file and line."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{_prefix(option)}{path} line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                          f"each line must be one JSON object: {line.strip()[:60]!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{_prefix(option)}{path} line {number} is a JSON {type(value).__name__}, not an object; each line must be one JSON object")
    return value


def _json_array(path: Path, text: str, option: str | None, hint: str = "") -> list[Any]:
    """A file's text that is one JSON array, parsed; a syntax error is one ``ConfigError`` line with its position."""
    try:
        return list(json.loads(text))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{_prefix(option)}could not read {path} as json: line {err.lineno} column {err.colno}: {err.msg}{hint}") from None


def _sharegpt_hint(path: Path) -> str:
    return f"; a ShareGPT-style JSON array (even one cut mid-record) reads with dataset: sharegpt:{path}"


def _raise_first_bad_json(path: Path, option: str | None) -> None:
    """Find what made a JSON file unreadable and raise it as one line: the first bad line of a JSON-lines file, or the array's error position."""
    if first_char(path) == "[":
        text = read_text(path)
        if text is not None:
            _json_array(path, text, option, _sharegpt_hint(path))
        return
    for number, line in numbered_lines(path):
        if line.strip():
            _json_line(path, number, line, option)


def load_file(path: Path, option: str | None = "data.dataset") -> Any:
    """A local data file through ``load_dataset`` (a ``datasets.Dataset``); an empty or unparseable file is one ``ConfigError`` line naming it (and the bad line)."""
    from datasets import load_dataset

    builder = file_builder(path, option)
    if first_char(path) == "":
        raise ConfigError(f"{_prefix(option)}{path} is empty (no rows)")
    try:
        return load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # DatasetGenerationError, ArrowInvalid, JSONDecodeError...: say which file, in one line
        if builder == "json":
            _raise_first_bad_json(path, option)
        if "corresponds to no data" in innermost_message(err):  # a CSV with a header and nothing else
            raise ConfigError(f"{_prefix(option)}{path} has no rows") from None
        hint = _sharegpt_hint(path) if builder == "json" else ""
        raise ConfigError(f"{_prefix(option)}could not read {path} as {builder}: {innermost_message(err)}{hint}") from None


def load_rows(path: str | Path, option: str | None = None) -> list[dict[str, Any]]:
    """The rows of a local data file as Python dicts: JSON (an array, or one object a line) parsed here, csv/parquet through ``load_file``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if file_builder(path, option) != "json":
        return list(load_file(path, option))
    text = read_text(path)
    if text is None:
        return list(load_file(path, option))
    stripped = text.lstrip(" \t\r\n\ufeff")
    if stripped.startswith("["):
        return _json_array(path, stripped, option)
    return [_json_line(path, number, line, option) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def load_source(dataset: str, option: str = "data.dataset") -> Any:
    """A ``save_to_disk`` folder, a folder of data files, or a dataset name for ``load_dataset`` (a ``Dataset`` or ``DatasetDict``).

    One that cannot be loaded (not found offline, no such dataset, no data files) is one ``ConfigError`` line.
    """
    from datasets import load_dataset, load_from_disk

    path = Path(dataset).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            return load_from_disk(str(path))
        return load_dataset(str(path) if path.is_dir() else dataset)
    except Exception as err:
        raise ConfigError(f"{option}: could not load '{dataset}': {innermost_message(err)}") from err


def pick_split(loaded: Any, split: str, dataset: str, option: str | None = None) -> Any:
    """``loaded[split]``; a split it lacks is one ``ConfigError`` line listing those it has."""
    if split not in loaded:
        raise ConfigError(f"{_prefix(option)}split '{split}' not in dataset '{dataset}' (splits: {sorted(loaded)})")
    return loaded[split]
