"""Data errors name the file, its 1-based line (or row) as written — before the seeded train/val shuffle — and the field."""

import json

import pytest

from constraints import ConfigError
from l3m_lightning.data import ChatDataModule, row_to_messages


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]}


def setup(path, **kwargs) -> ChatDataModule:
    dm = ChatDataModule(dataset=str(path), batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


def one_line_error(path, match: str, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as caught:
        setup(path, **kwargs)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_null_content_names_the_file_line_and_field_not_the_shuffled_row(tmp_path, tokenizer):
    rows = [chat(i) for i in range(100)]
    rows[56]["messages"][1]["content"] = None  # line 57 of the file
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    one_line_error(path, r"chats.jsonl line 57: field 'messages\[1\].content' must be a string, got None$")
    # held out in validation instead (another split seed): still line 57
    one_line_error(path, r"chats.jsonl line 57: field 'messages\[1\].content'", split_seed=3, val_fraction=0.5)


def test_blank_lines_count_in_the_line_number(tmp_path, tokenizer):
    lines = [json.dumps(chat(i)) for i in range(20)]
    lines[9] = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]})
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n\n".join(lines))  # a blank line between rows: row 10 is line 19
    one_line_error(path, r"gaps.jsonl line 19: field 'messages\[1\].content' \(the reference response\) is empty")


def test_missing_field_lists_the_fields_the_row_has(tmp_path, tokenizer):
    rows = [chat(i) for i in range(20)]
    rows[4] = {"msgs": [{"role": "user", "content": "x"}], "id": 4}
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    message = one_line_error(path, r"mixed.jsonl line 5: expected a 'messages' field .* found fields \['id', 'msgs'\]$")
    assert "'messages'" not in message.split("found fields")[1]


def test_prompt_response_rows_beside_chat_rows(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)] + [chat(0)]
    rows[12] = {"prompt": "q", "response": None}
    path = tmp_path / "flat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    one_line_error(path, r"flat.jsonl line 13: field 'response' must be a non-empty string, got None")


def test_a_line_that_is_not_json_is_named(tmp_path, tokenizer):
    lines = [json.dumps(chat(i)) for i in range(20)]
    lines[6] = '{"messages": oops}'
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines))
    one_line_error(path, r"data.dataset: .*broken.jsonl line 7 is not valid JSON \(Expecting value at column 14\)")
    lines[6] = "[1, 2]"
    path.write_text("\n".join(lines))
    one_line_error(path, r"broken.jsonl line 7 is a JSON list, not an object")


def test_empty_file_and_header_only_csv(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    one_line_error(tmp_path / "empty.jsonl", r"data.dataset: .*empty.jsonl is empty \(no rows\)")
    (tmp_path / "header.csv").write_text("prompt,response\n")
    one_line_error(tmp_path / "header.csv", r"data.dataset: .*header.csv has no rows")


def test_too_few_rows_for_the_split_says_how_many_and_what_to_change(tmp_path, tokenizer):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(chat(0)))
    one_line_error(path, r"data.val_fraction=0.05: holding out 1 of the 1 rows of .*one.jsonl leaves no training rows; "
                         r"add rows, lower data.val_fraction, or give a data.val_split")


def test_missing_file_or_folder_fails_when_the_data_module_is_built(tmp_path):
    for missing in (str(tmp_path / "nope.jsonl"), "nope.jsonl", str(tmp_path / "folder")):
        with pytest.raises(ConfigError, match=f"data.dataset: no such file or folder: {missing}"):
            ChatDataModule(dataset=missing)


def test_csv_json_array_and_parquet_name_lines_or_rows(tmp_path, tokenizer):
    import pandas as pd

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    rows[3]["response"] = ""
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    one_line_error(tmp_path / "d.csv", r"d.csv line 5: field 'response'")  # the header is line 1
    (tmp_path / "d.json").write_text(json.dumps(rows))
    one_line_error(tmp_path / "d.json", r"d.json row 4 of 10: field 'response'")
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    one_line_error(tmp_path / "d.parquet", r"d.parquet row 4 of 10: field 'response'")


def test_saved_dataset_names_split_and_row(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    rows = [chat(i) for i in range(8)]
    rows[6]["messages"][0]["role"] = None
    DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[:2])}).save_to_disk(tmp_path / "ds")
    one_line_error(tmp_path / "ds", r"dataset '.*ds' split 'train' row 7 of 8: field 'messages\[0\].role' must be a string", val_split="validation")


def test_row_to_messages_still_takes_a_row_number():
    with pytest.raises(ValueError, match=r"dataset row 7: field 'messages\[0\].content' must be a string"):
        row_to_messages({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, 7)
