import json

import pytest
import torch

from l3m_lightning.data import IGNORE_INDEX, ChatCollator, ChatDataModule, row_to_messages, tokenize_messages


def test_both_row_forms_become_messages():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    flat = {"prompt": "hi", "response": "hello"}
    assert row_to_messages(chat, 0) == row_to_messages(flat, 1)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, r"row 7: field 'messages' must be a list of at least 2"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}, r"row 7: .*must end with an assistant turn"),
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"row 7: field 'messages\[0\].content' must be a string"),
        ({"prompt": "hi", "response": ""}, r"row 7: field 'response' must be a non-empty string"),
        ({"question": "hi"}, r"row 7: expected a 'messages' field or 'prompt'/'response' fields"),
    ],
)
def test_malformed_rows_name_row_and_field(row, message):
    with pytest.raises(ValueError, match=message):
        row_to_messages(row, 7)


def test_chat_template_masks_prompt_and_ends_response_with_eos(tokenizer):
    messages = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}]
    row = tokenize_messages(tokenizer, messages, 256, 256)
    assert row["response_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["response_ids"], skip_special_tokens=True) == "4."
    batch = ChatCollator(tokenizer.pad_token_id)([{**row, "prompt_text": "q", "response_text": "4."}, {**row, "prompt_ids": row["prompt_ids"][2:], "prompt_text": "q", "response_text": "4."}])
    n_prompt = len(row["prompt_ids"])
    assert (batch["labels"][0, :n_prompt] == IGNORE_INDEX).all()
    assert batch["labels"][0, n_prompt : n_prompt + len(row["response_ids"])].tolist() == row["response_ids"]
    # prompts are left-padded for generation: the shorter one starts with padding
    assert batch["prompt_attention_mask"][1, :2].tolist() == [0, 0] and batch["prompt_attention_mask"][1, -1] == 1
    assert batch["prompt_input_ids"][1, 2:].tolist() == row["prompt_ids"][2:]


def test_local_jsonl_dataset_and_malformed_row(tmp_path, tokenizer):
    good = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(20)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good))
    dm = ChatDataModule(dataset=str(path), batch_size=4, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 16 and len(dm.splits["val"]) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and (batch["labels"] != IGNORE_INDEX).any()

    bad = good + [{"prompt": "q", "response": None}]
    path.write_text("\n".join(json.dumps(r) for r in bad))
    with pytest.raises(ValueError, match=r"train.jsonl line 21: field 'response' must be a non-empty string"):
        ChatDataModule(dataset=str(path), batch_size=4, val_fraction=0.2).setup("fit")


def test_save_to_disk_folder_with_splits(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(8)]
    DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[:2])}).save_to_disk(tmp_path / "ds")
    dm = ChatDataModule(dataset=str(tmp_path / "ds"), val_split="validation", batch_size=2)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 8 and len(dm.splits["val"]) == 2
    with pytest.raises(ValueError, match="split 'dev' not in dataset"):
        ChatDataModule(dataset=str(tmp_path / "ds"), val_split="dev").setup("fit")


def test_gzipped_jsonl_dataset(tmp_path, tokenizer):
    import gzip

    rows = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(10)]
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    dm = ChatDataModule(dataset=str(tmp_path / "train.jsonl.gz"), batch_size=2, val_fraction=0.2)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 8
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        ChatDataModule(dataset=str(tmp_path / "x.txt")).setup("fit")


def test_response_stops_at_eos_and_pad_eq_eos_still_trains_on_eos(tokenizer):
    """A ChatML-like template puts "\\n" after the end-of-turn token; the model never generates it."""
    from transformers import AutoTokenizer

    chatml = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    chatml.chat_template = (
        "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    chatml.pad_token = chatml.eos_token
    assert chatml.pad_token_id == chatml.eos_token_id
    messages = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}]
    row = tokenize_messages(chatml, messages, 256, 256)
    assert row["response_ids"][-1] == chatml.eos_token_id  # no trailing "\n" after EOS
    assert chatml.decode(row["response_ids"]) == "4.<|end|>"
    short = {**row, "response_ids": row["response_ids"][:1], "prompt_text": "q", "response_text": "4"}
    batch = ChatCollator(chatml.pad_token_id)([{**row, "prompt_text": "q", "response_text": "4."}, short])
    end = len(row["prompt_ids"]) + len(row["response_ids"])
    assert batch["labels"][0, end - 1] == chatml.eos_token_id  # EOS is learnt although it is also the pad token
    assert (batch["labels"][1, end - 1 :] == IGNORE_INDEX).all()  # padding is not


def test_unparseable_json_file_is_one_line_naming_the_file(tmp_path, tokenizer):
    path = tmp_path / "chats.json"
    path.write_text('[{"prompt": "q", "response": "a"}, {"prompt": "q2", "resp')  # cut mid-record
    with pytest.raises(ValueError, match=r"data.dataset: could not read .*chats.json as json: .*sharegpt:") as caught:
        ChatDataModule(dataset=str(path)).setup("fit")
    assert isinstance(caught.value, ValueError) and caught.value.__cause__ is None and "\n" not in str(caught.value)


def test_multi_turn_messages_prompt_text_is_the_whole_dialogue(tmp_path, tokenizer):
    turns = [("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")]
    rows = [{"messages": [{"role": r, "content": f"{c} {i}"} for r, c in turns]} for i in range(4)]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = ChatDataModule(dataset=str(path), val_fraction=0.5, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    i = batch["references"][0].split()[-1]
    assert batch["prompts"][0] == f"u1 {i}\n\nAssistant: a1 {i}\n\nHuman: u2 {i}"
