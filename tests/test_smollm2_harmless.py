"""experiments/smollm2_harmless.py's pieces that need no model: HH dialogues as chat messages, the split, the runs' settings."""

import gzip
import json
import sys
import warnings
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import smollm2_harmless as exp  # noqa: E402
from l3m_lightning.data import conversation_prompt_text  # noqa: E402


def _dialogue(i: int, reply: str) -> str:
    return f"\n\nHuman: question {i}?\n\nAssistant: earlier answer {i}\n\nHuman: and then?\n\nAssistant: {reply}"


def test_hh_dialogue_becomes_alternating_messages_that_read_back_as_the_rm_saw_them():
    messages = exp.hh_messages(_dialogue(7, "final reply"))
    assert messages == [
        {"role": "user", "content": "question 7?"}, {"role": "assistant", "content": "earlier answer 7"},
        {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "final reply"},
    ]
    # what the reward_model constraint is given as the prompt: the HH dialogue before the final reply
    assert conversation_prompt_text(messages) == "question 7?\n\nAssistant: earlier answer 7\n\nHuman: and then?"


def test_prepare_data_keeps_the_reward_models_split_and_drops_broken_dialogues(tmp_path):
    from datasets import Dataset, load_from_disk

    rows = [{"chosen": _dialogue(i, "" if i == 3 else f"reply {i}"), "rejected": _dialogue(i, "bad")} for i in range(20)]
    rows[5]["chosen"] = "\n\nHuman: one\n\nHuman: two\n\nAssistant: not alternating"
    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    info = exp.prepare_data(tmp_path / "data", hh_file=hh, val_fraction=0.2, split_seed=0)
    data = load_from_disk(str(tmp_path / "data"))
    expected = Dataset.from_dict({"i": list(range(20))}).train_test_split(test_size=0.2, seed=0, shuffle=True)
    for name in ("train", "test"):
        assert data[name]["row"] == [i for i in expected[name]["i"] if i not in (3, 5)]
    assert info["dropped"] == 2 and info["train_rows"] + info["test_rows"] == 18
    row = next(r for r in data["train"])
    assert row["messages"][-1] == {"role": "assistant", "content": f"reply {row['row']}"}


def test_only_the_l3m_run_gets_the_training_rm_and_the_bound(tmp_path):
    harmless = exp.run_settings("harmless", tmp_path, threshold=0.42, steps=5, eval_rows=7)
    (constraint,) = harmless["model.constraints"]
    assert constraint["threshold"] == 0.42 and constraint["calibration"] == "held_out" and constraint["sense"] == "at_least"
    assert constraint["model_name_or_path"] == str(exp.rm_export(tmp_path, exp.TRAINING_RM))
    assert (harmless["trainer.max_steps"], harmless["data.max_val_rows"], harmless["data.dataset"]) == (5, 7, tmp_path / "hh_messages")
    sft = exp.run_settings("sft", tmp_path, threshold=0.42, steps=5, eval_rows=None)
    assert "model.constraints" not in sft and sft["trainer.max_steps"] == 5
    assert "trainer.max_steps" not in exp.run_settings("untrained", tmp_path, threshold=None, steps=5, eval_rows=None)


def test_bound_holds_with_confidence_only_when_the_whole_interval_is_above_it():
    row = {"rewards": {exp.TRAINING_RM: {"mean": 0.5, "low": 0.35, "high": 0.65}}}
    assert exp.holds(row, 0.3) == "yes (95%)"
    assert exp.holds(row, 0.4) == "yes"
    assert exp.holds(row, 0.6) == "no"


def test_frozen_configs_parse_and_differ_only_in_the_constraint(capfd):
    from l3m_lightning.cli import main

    printed = {}
    for run in ("sft", "harmless"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(SystemExit) as caught:
                main(["fit", "--config", str(exp.config(run)), "--print_config"])
        assert caught.value.code in (0, None)
        printed[run] = yaml.safe_load(capfd.readouterr().out)
    sft, harmless = printed["sft"], printed["harmless"]
    assert sft["model"]["constraints"] == [] and harmless["model"]["constraints"][0]["name"] == "harmlessness"
    for section in ("data", "model"):
        same = {k: v for k, v in sft[section].items() if k != "constraints"}
        assert same == {k: v for k, v in harmless[section].items() if k != "constraints"}, section
    assert sft["trainer"]["max_steps"] == harmless["trainer"]["max_steps"]
