"""Reward-model trainer: preference data parsing, Bradley–Terry training on a separable toy, export → reward_model."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from _tiny_models import WORDS, build_reward_model

from constraints import build_constraint
from constraints.reward_model import FORMAT_FILE
from l3m_lightning.reward import PreferenceDataModule, RewardModelModule, preference_pair, split_hh_dialogue

ROOT = Path(__file__).resolve().parents[1]
MARKER = "please"
FILLER = [w for w in WORDS if w not in (MARKER, "human", "assistant", ":", "thanks", "sorry")]


def toy_pairs(n: int, seed: int) -> list[dict]:
    """Chosen and rejected replies share their words, except that the chosen one contains the marker."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choices(FILLER, k=rng.randint(3, 6))) + " ?"
        words = rng.choices(FILLER, k=rng.randint(4, 9))
        chosen = list(words)
        chosen[rng.randrange(len(words))] = MARKER
        row = {"chosen": " ".join(chosen), "rejected": " ".join(words)}
        if i % 2:  # half as HH dialogues, half with a prompt column
            row = {k: f"\n\nHuman: {prompt}\n\nAssistant: {v}" for k, v in row.items()}
        else:
            row["prompt"] = prompt
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    return build_reward_model(tmp_path_factory.mktemp("backbone") / "tiny-bert", kind="bert", seed=0, hidden=32)


# --- data -------------------------------------------------------------------------------------------
def test_split_hh_dialogue_keeps_earlier_turns_in_the_prompt():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to bake?\n\nAssistant: Use an oven."
    assert split_hh_dialogue(text, "row") == ("hi\n\nAssistant: hello\n\nHuman: how to bake?", "Use an oven.")
    # With the default template the formatted text is the dialogue as written.
    prompt, reply = split_hh_dialogue(text, "row")
    assert f"\n\nHuman: {prompt}\n\nAssistant: {reply}" == text
    assert split_hh_dialogue("\n\nHuman: hi\n\nAssistant:", "row") == ("hi", "")


def test_preference_pair_forms():
    assert preference_pair({"prompt": "p", "chosen": "a", "rejected": "b"}, 0) == (("p", "a"), ("p", "b"))
    assert preference_pair({"chosen": "good text", "rejected": "bad text"}, 0) == ((None, "good text"), (None, "bad text"))
    hh = preference_pair({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, 0)
    assert hh == (("q", "a"), ("q", "b"))
    custom = preference_pair({"q": "p", "good": "a", "bad": "b"}, 0, prompt_column="q", chosen_column="good", rejected_column="bad")
    assert custom == (("p", "a"), ("p", "b"))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"chosen": "a"}, r"preference row 7: field 'rejected' is missing"),
        ({"chosen": "", "rejected": "b"}, r"preference row 7: field 'chosen' must be a non-empty string"),
        ({"chosen": 3, "rejected": "b"}, r"preference row 7: field 'chosen' must be a non-empty string"),
        ({"prompt": 1, "chosen": "a", "rejected": "b"}, r"preference row 7: field 'prompt' must be a string"),
        ({"chosen": "\n\nHuman: q only", "rejected": "\n\nHuman: q\n\nAssistant: b"}, r"preference row 7: field 'chosen': HH-style dialogue has no"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "plain"}, r"preference row 7: .*both be HH-style dialogues or both plain"),
    ],
)
def test_malformed_rows_name_row_and_field(row, message):
    with pytest.raises(ValueError, match=message):
        preference_pair(row, 7)


def test_datamodule_splits_and_reports_bad_rows_by_file_index(tiny_backbone, tmp_path):
    rows = toy_pairs(50, seed=1)
    dm = PreferenceDataModule(str(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer=str(tiny_backbone), val_fraction=0.2, batch_size=4)
    dm.setup("fit")
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (40, 10)
    batch = next(iter(dm.train_dataloader()))
    assert batch["num_pairs"] == 4 and batch["input_ids"].shape[0] == 8 and batch["attention_mask"].shape == batch["input_ids"].shape

    rows[33] = {"prompt": "p", "chosen": "a", "rejected": None}
    bad = PreferenceDataModule(str(write_jsonl(tmp_path / "bad.jsonl", rows)), tokenizer=str(tiny_backbone))
    with pytest.raises(ValueError, match=r"preference row 33: field 'rejected' must be a non-empty string"):
        bad.setup("fit")


# --- training ---------------------------------------------------------------------------------------
def test_freeze_backbone_trains_only_the_head(tiny_backbone):
    frozen = RewardModelModule(str(tiny_backbone), freeze_backbone=True)
    trainable = {n for n, p in frozen.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.") or ".pooler." in n for n in trainable)
    top = RewardModelModule(str(tiny_backbone), freeze_backbone=True, unfreeze_top_layers=1)
    trainable_top = {n for n, p in top.model.named_parameters() if p.requires_grad}
    assert any(".layer.1." in n for n in trainable_top) and not any(".layer.0." in n for n in trainable_top)
    with pytest.raises(ValueError, match="only applies with model.freeze_backbone"):
        RewardModelModule(str(tiny_backbone), unfreeze_top_layers=1)
    pooled = RewardModelModule(str(tiny_backbone), pooling="mean", freeze_backbone=True)
    assert {n for n, p in pooled.model.named_parameters() if p.requires_grad} == {"score.weight", "score.bias"}
    with pytest.raises(ValueError, match="model.pooling must be"):
        RewardModelModule(str(tiny_backbone), pooling="max")


@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_bradley_terry_learns_separable_toy_and_exports_for_the_constraint(tiny_backbone, tmp_path, pooling):
    L.seed_everything(0)
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(240, seed=0))
    dm = PreferenceDataModule(str(data), tokenizer=str(tiny_backbone), val_fraction=0.25, batch_size=16, max_length=48)
    export = tmp_path / "rm"
    module = RewardModelModule(str(tiny_backbone), pooling=pooling, learning_rate=3e-3, warmup_ratio=0.0, weight_decay=0.0, export_dir=str(export))
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
    )
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert after["val/accuracy"] >= 0.9, (before, after)  # chance is 0.5
    assert after["val/loss"] < before["val/loss"]

    # The export loads by path in the reward_model constraint, with the training format, and ranks held-out pairs.
    spec = json.loads((export / FORMAT_FILE).read_text())
    assert spec["format"]["template"] == dm.hparams.template and spec["format"]["max_length"] == 48
    assert spec["held_out"]["accuracy"] >= 0.9 and spec["held_out"]["std"] > 0
    rm = build_constraint({"name": "reward_model", "model_name_or_path": str(export), "threshold": 0.0, "scale": 1.0})
    held_out = [r for r in toy_pairs(40, seed=99) if "prompt" in r]
    prompts = [r["prompt"] for r in held_out]
    chosen = rm.evaluate(prompts, [r["chosen"] for r in held_out], [[1]] * len(held_out))[0]
    rejected = rm.evaluate(prompts, [r["rejected"] for r in held_out], [[1]] * len(held_out))[0]
    assert rm.max_length == 48 and (chosen > rejected).float().mean() >= 0.9
    # `calibration: held_out` standardises with exactly the statistics the export recorded
    calibrated = build_constraint({"name": "reward_model", "model_name_or_path": str(export), "threshold": 0.0, "calibration": "held_out"})
    assert (calibrated.calibration["mean"], calibrated.calibration["std"]) == (spec["held_out"]["mean"], spec["held_out"]["std"])
    assert type(rm.model).__name__ == ("BertForSequenceClassification" if pooling == "model" else "PooledRewardModel")


@pytest.mark.slow
def test_pooled_export_loads_in_a_fresh_process(tiny_backbone, tmp_path):
    """Only `constraints` imported: the reward_model constraint registers the pooled model type itself."""
    RewardModelModule(str(tiny_backbone), pooling="mean").export(tmp_path / "rm")
    code = (
        "from constraints import build_constraint\n"
        f"c = build_constraint({{'name': 'reward_model', 'model_name_or_path': {str(tmp_path / 'rm')!r}, 'threshold': 0.0, 'scale': 1.0}})\n"
        "print(type(c.model).__name__ if c.load() is None else '', c.score(['hi'], ['a good dog'], []).shape)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PooledRewardModel torch.Size([1])" in proc.stdout


def test_reward_cli_fits_from_the_command_line_and_config_parses(tiny_backbone, tmp_path, monkeypatch):
    from l3m_lightning.reward_cli import main

    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(24, seed=3))
    main(
        [
            "fit", "--model.model_name_or_path", str(tiny_backbone), "--data.dataset", str(data), "--data.batch_size", "4",
            "--trainer.max_steps", "3", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_model_summary", "false",
        ]
    )
    exported = list((tmp_path / "runs").rglob(f"hf_model/{FORMAT_FILE}"))
    assert len(exported) == 1 and (exported[0].parent / "config.json").exists()

    with pytest.raises(SystemExit) as info:  # the shipped config is valid for this CLI
        main(["fit", "--config", str(ROOT / "configs" / "rm-harmless.yaml"), "--print_config"])
    assert info.value.code in (0, None)
