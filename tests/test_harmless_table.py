"""experiments/harmless_table.py's data conversion and violated→satisfied read-out, on hand-made data."""

import argparse
import gzip
import json
import sys
import warnings
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from constraints import build_constraint  # noqa: E402
from experiments import harmless_table  # noqa: E402


def _dialogue(i: int, reply: str) -> str:
    return f"\n\nHuman: question {i}?\n\nAssistant: earlier answer {i}\n\nHuman: and then?\n\nAssistant: {reply}"


def test_prepare_data_splits_like_the_reward_model_and_flattens_prompts(tmp_path):
    from datasets import Dataset, load_from_disk

    rows = [{"chosen": _dialogue(i, "" if i == 3 else f"reply {i}"), "rejected": _dialogue(i, "bad")} for i in range(20)]
    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    info = harmless_table.prepare_data(hh, tmp_path / "data", val_fraction=0.2, split_seed=0)
    data = load_from_disk(str(tmp_path / "data"))
    # the RM's split: train_test_split of the rows in file order, same fraction and seed
    expected = Dataset.from_dict({"i": list(range(20))}).train_test_split(test_size=0.2, seed=0, shuffle=True)
    for name in ("train", "test"):
        assert data[name]["row"] == [i for i in expected[name]["i"] if i != 3]  # the empty reply is dropped
    assert info["dropped_empty"] == 1 and info["train_rows"] + info["test_rows"] == 19
    row = data["train"][0]
    i = row["row"]
    # prompt: the dialogue up to the final Assistant turn, as the RM saw it (leading "Human:" stripped)
    assert row["prompt"] == f"question {i}?\n\nAssistant: earlier answer {i}\n\nHuman: and then?"
    assert row["response"] == f"reply {i}"


def test_transition_reads_violated_then_satisfied():
    ema = [(0, 0.5), (1, 0.2), (2, -0.1), (3, 0.05), (4, -0.2)]
    out = harmless_table.transition(ema)
    assert out["violated_at_start"] and out["first_satisfied_step"] == 2
    assert out["satisfied_fraction_after"] == 2 / 3
    assert harmless_table.transition([(0, -0.1), (1, 0.3)]) == {
        "violated_at_start": False, "ema_start": -0.1, "ema_end": 0.3, "first_satisfied_step": None
    }
    assert harmless_table.transition([(0, 0.4), (1, 0.3)])["first_satisfied_step"] is None


def test_constraint_ema_callback_is_read_back_from_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step, value in enumerate([0.3, 0.1, -0.05]):
        writer.add_scalar(harmless_table.EMA_TAG, value, step)
    writer.close()
    series = harmless_table.tensorboard_scalars(tmp_path, [harmless_table.EMA_TAG, "missing/tag"])
    assert [s for s, _ in series[harmless_table.EMA_TAG]] == [0, 1, 2]
    assert series["missing/tag"] == []
    assert harmless_table.transition(series[harmless_table.EMA_TAG])["first_satisfied_step"] == 2


def _rm_folder(tmp_path: Path, spec: dict) -> Path:
    """An RM folder as far as the calibration goes: just its l3m_reward_model.json (no model is loaded)."""
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "l3m_reward_model.json").write_text(json.dumps(spec))
    return folder


def test_constraint_uses_held_out_calibration_with_the_numbers_once_copied_by_hand(tmp_path):
    held = {"mean": 0.123456789012345, "std": 1.0987654321, "accuracy": 0.663}
    args = argparse.Namespace(rm=_rm_folder(tmp_path, {"format": {}, "held_out": held}), threshold=None, scale=None)
    spec = harmless_table.constraint_spec(args)
    assert spec["calibration"] == "held_out" and spec["model_name_or_path"] == str(args.rm)
    assert (spec["threshold"], spec["scale"]) == (0.45, 2.0)  # the frozen config's
    # the mean/std the script used to copy into the spec, bit for bit
    assert harmless_table.rm_calibration(args) == {"mean": float(held["mean"]), "std": float(held["std"])}
    constraint = build_constraint(spec)
    assert (constraint.calibration["mean"], constraint.calibration["std"], constraint.scale) == (held["mean"], held["std"], 2.0)
    for run in harmless_table.RUNS:
        assert harmless_table.config_value(harmless_table.config(run), "model.constraints")[0]["calibration"] == "held_out"


def test_rm_without_held_out_statistics_stops_the_script_in_one_line(tmp_path):
    args = argparse.Namespace(rm=_rm_folder(tmp_path, {"format": {}}), threshold=None, scale=None)
    with pytest.raises(SystemExit) as caught:
        harmless_table.rm_calibration(args)
    assert str(caught.value) == (
        f"--rm: constraint 'harmlessness': calibration: held_out needs {args.rm / 'l3m_reward_model.json'} with held-out "
        "reward mean/std (export the RM with `cli.py rm fit`), got a file without them"
    )


def test_frozen_configs_parse_with_held_out(capfd):
    from l3m_lightning.cli import main

    for run in harmless_table.RUNS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(SystemExit) as caught:
                main(["fit", "--config", str(harmless_table.config(run)), "--print_config"])
        assert caught.value.code in (0, None)
        constraint = yaml.safe_load(capfd.readouterr().out)["model"]["constraints"][0]
        assert constraint["calibration"] == "held_out" and constraint["name"] == "harmlessness"
