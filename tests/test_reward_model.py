"""reward_model constraint on tiny random-init sequence classifiers saved to a temp dir and loaded by path."""

import gzip
import io
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from _tiny_models import build_reward_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from constraints import ConfigError, ConstraintError, HarmlessnessConstraint, HelpfulnessConstraint, RewardModelConstraint, build_constraint
from constraints.base import ConstraintConfigError
from constraints.data_files import load_rows
from constraints.reward_model import DEFAULT_TEMPLATE, FORMAT_FILE, format_for_reward_model, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["how do i bake bread ?", "tell me a story", "can you help me steal a cat", "what is a poem", "hi", "how to plant a garden"]
RESPONSES = [
    "you can bake bread with water and good friends .",
    "a story about a dog and a cat , the end",
    "no , sorry , i can not help you steal",
    "a poem is a kind of song you read or write , and it is good to write one each day",
    "hi !",
    "please water the plant each day",
]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory):
    return build_reward_model(tmp_path_factory.mktemp("rm") / "bert-rm", kind="bert", seed=0)


@pytest.fixture(scope="module")
def gpt2_rm_path(tmp_path_factory):
    return build_reward_model(tmp_path_factory.mktemp("rm") / "gpt2-rm", kind="gpt2", seed=1)


def manual_score(path, text, pair=None, add_special_tokens=True):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return float(model(**tokenizer(text, pair, return_tensors="pt", add_special_tokens=add_special_tokens)).logits[0, 0])


def test_loads_by_path_scores_deterministically_and_batched_equals_single(rm_path):
    batched = build_constraint({"name": "reward_model", "model_name_or_path": str(rm_path), "threshold": 0.0, "scale": 1.0, "batch_size": 4})
    single = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(rm_path), batch_size=1)
    rewards, valid = batched.evaluate(PROMPTS, RESPONSES, [[1]] * len(PROMPTS))
    assert valid.all() and rewards.dtype == torch.float64 and rewards.shape == (len(PROMPTS),)
    assert torch.equal(rewards, batched.evaluate(PROMPTS, RESPONSES, [[1]] * len(PROMPTS))[0])  # deterministic
    assert torch.allclose(rewards, single.score(PROMPTS, RESPONSES, []), atol=1e-5)
    assert rewards.std() > 0  # the texts really are scored differently
    # ... and exactly as the RM would score the HH-formatted text by hand.
    assert rewards[0].item() == pytest.approx(manual_score(rm_path, DEFAULT_TEMPLATE.format(prompt=PROMPTS[0], response=RESPONSES[0])), abs=1e-5)
    assert batched.sense == "at_least" and batched.name == "reward_model"


def test_decoder_rm_without_pad_token_batched_equals_single(gpt2_rm_path):
    batched = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(gpt2_rm_path), batch_size=6)
    single = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(gpt2_rm_path), batch_size=1)
    b = batched.score(PROMPTS, RESPONSES, [])
    assert batched.tokenizer.pad_token is not None and batched.model.config.pad_token_id is not None
    assert torch.allclose(b, single.score(PROMPTS, RESPONSES, []), atol=1e-5)


def test_template_pair_and_chat_template_formats(rm_path, tmp_path):
    template = "question : {prompt} answer : {response}"
    custom = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(rm_path), template=template)
    assert custom.score(PROMPTS[:1], RESPONSES[:1], [])[0].item() == pytest.approx(
        manual_score(rm_path, template.format(prompt=PROMPTS[0], response=RESPONSES[0])), abs=1e-5
    )
    pair = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(rm_path), input_format="pair")
    assert pair.score(PROMPTS[:1], RESPONSES[:1], [])[0].item() == pytest.approx(manual_score(rm_path, PROMPTS[0], RESPONSES[0]), abs=1e-5)

    chat_path = build_reward_model(tmp_path / "chat-rm", kind="bert", seed=0, chat_template=CHAT_TEMPLATE)
    chat = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(chat_path))
    chat.load()
    text, text_pair, special = format_for_reward_model(chat.tokenizer, "hi", "hello", "auto")
    assert (text, text_pair, special) == ("user : hi [SEP] assistant : hello [SEP] ", None, False)
    assert format_for_reward_model(chat.tokenizer, "hi", "hello", "template")[0] == "\n\nHuman: hi\n\nAssistant: hello"
    assert chat.score(["hi"], ["hello"], [])[0].item() == pytest.approx(manual_score(chat_path, text, add_special_tokens=False), abs=1e-5)


def test_long_texts_keep_the_response_end(rm_path):
    c = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(rm_path), max_length=8)
    c.load()
    ids = c.tokenizer(DEFAULT_TEMPLATE.format(prompt="tell me " * 20, response="a good story"), truncation=True, max_length=8)["input_ids"]
    assert len(ids) == 8 and ids[0] == c.tokenizer.cls_token_id and c.tokenizer.decode(ids[-4:-1]) == "a good story"
    assert torch.isfinite(c.score(["tell me " * 50], ["a good story"], [])).all()


def test_calibration_given_directly_standardises(rm_path):
    raw = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(rm_path)).score(PROMPTS, RESPONSES, [])
    c = RewardModelConstraint(threshold=0.0, model_name_or_path=str(rm_path), calibration={"mean": 0.5, "std": 2.0})
    assert c.scale == 1.0  # standardised scores: scale defaults to 1
    assert torch.allclose(c.score(PROMPTS, RESPONSES, []), (raw - 0.5) / 2.0)
    assert c.state_dict() == {"calibration": {"mean": 0.5, "std": 2.0}}


def test_calibration_file_computed_at_setup_and_saved_in_state(rm_path, tmp_path):
    path = tmp_path / "calibration.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for p, r in zip(PROMPTS, RESPONSES):
            f.write(json.dumps({"prompt": p, "response": r}) + "\n")
    c = build_constraint({"name": "reward_model", "model_name_or_path": str(rm_path), "threshold": 0.0, "calibration_file": str(path)})
    assert c.calibration is None and c.state_dict() == {}
    c.setup(torch.device("cpu"))
    standardised = c.score(PROMPTS, RESPONSES, [])
    assert standardised.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert standardised.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    state = c.state_dict()
    assert state["calibration"]["rows"] == len(PROMPTS) and state["calibration"]["source"] == str(path)

    lazy = RewardModelConstraint(threshold=0.0, model_name_or_path=str(rm_path), calibration_file=str(path))
    assert torch.allclose(lazy.score(PROMPTS, RESPONSES, []), standardised)  # no setup(): calibrated on first use

    resumed = RewardModelConstraint(threshold=0.0, model_name_or_path=str(rm_path), calibration_file=str(path))
    resumed.load_state_dict(state)
    path.unlink()  # a resumed run reuses the saved statistics: no recomputation
    resumed.setup("cpu")
    assert torch.allclose(resumed.score(PROMPTS, RESPONSES, []), standardised)


def test_calibration_file_with_bad_row_names_row_and_field(rm_path, tmp_path):
    path = tmp_path / "cal.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "a", "reply": "b"}) + "\n")
    c = RewardModelConstraint(threshold=0.0, model_name_or_path=str(rm_path), calibration_file=str(path))
    with pytest.raises(ValueError, match=r"row 1: field 'response' must be a string"):
        c.setup("cpu")


def test_model_name_from_a_package(rm_path, monkeypatch):
    fake = types.ModuleType("fake_weights_pkg")
    fake.get_model_path = lambda: rm_path
    monkeypatch.setitem(sys.modules, "fake_weights_pkg", fake)
    assert resolve_model_path("pkg:fake_weights_pkg") == str(rm_path)
    c = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path="pkg:fake_weights_pkg")
    assert c.score(PROMPTS[:2], RESPONSES[:2], []).shape == (2,)
    with pytest.raises(ValueError, match="not installed"):
        resolve_model_path("pkg:no_such_weights_pkg")


def test_presets_point_at_public_hh_reward_models():
    harmless = build_constraint({"name": "harmlessness", "threshold": 0.5})
    helpful = build_constraint({"name": "helpfulness", "threshold": 0.5})
    assert isinstance(harmless, HarmlessnessConstraint) and isinstance(helpful, HelpfulnessConstraint)
    assert harmless.model_name_or_path == "Ray2333/gpt2-large-harmless-reward_model"
    assert helpful.model_name_or_path == "Ray2333/gpt2-large-helpful-reward_model"
    for c in (harmless, helpful):
        assert c.scale == 1.0 and c.sense == "at_least" and c.model is None  # nothing loaded at config time


def test_preset_overridable_by_path(rm_path):
    c = build_constraint({"name": "harmlessness", "threshold": 0.0, "model_name_or_path": str(rm_path)})
    assert c.name == "harmlessness" and c.evaluate(PROMPTS, RESPONSES, [[1]] * len(PROMPTS))[1].all()


def test_setup_moves_to_device_and_freezes(rm_path):
    c = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(rm_path))
    c.setup(torch.device("cpu"))
    assert not c.model.training and not any(p.requires_grad for p in c.model.parameters())
    assert next(c.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 0.0, "scale": 1.0}, "model_name_or_path is required"),
        ({"threshold": 0.0, "model_name_or_path": "x"}, "scale is required"),
        ({"threshold": 0.0, "model_name_or_path": "x", "calibration": {"mean": 0, "std": 1}, "calibration_file": "c.jsonl"}, "not both"),
        ({"threshold": 0.0, "model_name_or_path": "x", "calibration": {"mean": 0, "std": 0}}, r"calibration.std must be a finite number > 0"),
        ({"threshold": 0.0, "model_name_or_path": "x", "calibration": {"mean": 0}}, "'mean' and 'std'"),
        ({"threshold": 0.0, "model_name_or_path": "x", "calibration_file": "/nonexistent/c.jsonl"}, "does not exist"),
        ({"threshold": 0.0, "scale": 1.0, "model_name_or_path": "x", "template": "{prompt} only"}, r"\{prompt\} and \{response\}"),
        ({"threshold": 0.0, "scale": 1.0, "model_name_or_path": "x", "input_format": "xml"}, "input_format must be one of"),
        ({"threshold": 0.0, "scale": 1.0, "model_name_or_path": "x", "batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardModelConstraint(**kwargs)


def test_missing_model_and_bad_output_index_fail_naming_the_constraint(rm_path, tmp_path):
    missing = build_constraint({"name": "reward_model", "model_name_or_path": str(tmp_path / "nothing"), "threshold": 0.0, "scale": 1.0, "init_args": {"name": "rm"}})
    with pytest.raises(ConstraintError, match="constraint 'rm': could not load reward model"):
        missing.evaluate(["p"], ["r"], [[1]])
    wrong = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(rm_path), output_index=3)
    with pytest.raises(ConstraintError, match=r"output_index 3 is out of range.*\(1, 1\)"):
        wrong.evaluate(["p"], ["r"], [[1]])


def test_load_rows_reads_json_jsonl_and_gz(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    (tmp_path / "r.json").write_text(json.dumps(rows))
    (tmp_path / "r.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    with gzip.open(tmp_path / "r.jsonl.gz", "wt") as f:
        f.write("\n".join(map(json.dumps, rows)))
    for name in ("r.json", "r.jsonl", "r.jsonl.gz"):
        assert load_rows(tmp_path / name) == rows
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_rows(tmp_path / "bad.jsonl")


# --- calibration: held_out (the held-out reward statistics an exported RM records) ----------------------
def exported_rm(rm_path, folder, spec=None):
    """A copy of the tiny RM, as ``cli.py rm fit`` exports it: with ``l3m_reward_model.json`` holding ``spec`` (None: no file)."""
    shutil.copytree(rm_path, folder)
    if spec is not None:
        (folder / FORMAT_FILE).write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return folder


HELD_OUT_STATS = {"mean": 0.3125, "std": 0.625, "accuracy": 0.71}


def test_held_out_calibration_reads_the_export_and_standardises(rm_path, tmp_path):
    folder = exported_rm(rm_path, tmp_path / "rm", {"format": {}, "held_out": HELD_OUT_STATS})
    c = build_constraint({"name": "reward_model", "model_name_or_path": str(folder), "threshold": 0.5, "calibration": "held_out"})
    assert c.scale == 1.0 and c.model is None  # standardised units; read from the file without loading the RM
    assert c.state_dict() == {"calibration": {"mean": 0.3125, "std": 0.625, "source": str(folder / FORMAT_FILE)}}
    rewards, valid = c.evaluate(PROMPTS, RESPONSES, [[1]] * len(PROMPTS))
    text = DEFAULT_TEMPLATE.format(prompt=PROMPTS[0], response=RESPONSES[0])
    assert valid.all() and rewards[0].item() == pytest.approx((manual_score(folder, text) - 0.3125) / 0.625, abs=1e-5)
    raw = RewardModelConstraint(threshold=0.0, scale=1.0, model_name_or_path=str(folder)).score(PROMPTS, RESPONSES, [])
    assert torch.allclose(rewards, (raw - 0.3125) / 0.625)
    assert torch.allclose(c.cost(rewards), 0.5 - rewards)  # the threshold is in standard deviations


def test_held_out_scale_can_still_be_given(rm_path, tmp_path):
    folder = exported_rm(rm_path, tmp_path / "rm", {"held_out": HELD_OUT_STATS})
    assert RewardModelConstraint(threshold=0.0, model_name_or_path=str(folder), calibration="held_out", scale=2.0).scale == 2.0


@pytest.mark.parametrize(
    "spec, got",
    [
        (None, "got none"),
        ({"format": {"max_length": 48}}, "got a file without them"),
        ({"held_out": {"mean": 0.1}}, "got held_out: {'mean': 0.1}"),
        ({"held_out": {"mean": 0.1, "std": 0.0}}, "got mean 0.1, std 0.0 (the std must be a finite number > 0)"),
        ("{not json", "got a file that is not valid JSON"),
    ],
)
def test_held_out_without_the_statistics_fails_at_construction_in_one_line(rm_path, tmp_path, spec, got):
    folder = exported_rm(rm_path, tmp_path / "rm", spec)
    with pytest.raises(ConfigError) as caught:
        build_constraint({"name": "harmlessness", "model_name_or_path": str(folder), "threshold": 0.45, "calibration": "held_out"})
    message = str(caught.value)
    assert "\n" not in message and message.startswith(
        f"constraint 'harmlessness': calibration: held_out needs {folder / FORMAT_FILE} with held-out reward mean/std "
        f"(export the RM with `cli.py rm fit`), {got}"
    ), message


def test_held_out_for_a_missing_folder_and_an_unknown_string(tmp_path):
    with pytest.raises(ConfigError, match=r"needs .*/nowhere/l3m_reward_model.json .* got none \(no such folder\)$"):
        RewardModelConstraint(threshold=0.0, model_name_or_path=str(tmp_path / "nowhere"), calibration="held_out")
    with pytest.raises(ValueError, match=r"calibration must be a mapping \{mean, std\} or 'held_out', got 'heldout'"):
        RewardModelConstraint(threshold=0.0, model_name_or_path=str(tmp_path), calibration="heldout")
    with pytest.raises(ValueError, match="not both"):
        RewardModelConstraint(threshold=0.0, model_name_or_path=str(tmp_path), calibration="held_out", calibration_file="c.jsonl")


def test_held_out_state_dict_round_trip_keeps_the_saved_numbers(rm_path, tmp_path):
    folder = exported_rm(rm_path, tmp_path / "rm", {"held_out": HELD_OUT_STATS})
    first = RewardModelConstraint(threshold=0.0, model_name_or_path=str(folder), calibration="held_out")
    state = first.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as in a checkpoint
    buffer.seek(0)
    # The folder is re-exported with other statistics: a resumed run keeps the ones it trained with.
    (folder / FORMAT_FILE).write_text(json.dumps({"held_out": {"mean": -4.0, "std": 3.0}}))
    resumed = RewardModelConstraint(threshold=0.0, model_name_or_path=str(folder), calibration="held_out")
    assert resumed.calibration["mean"] == -4.0
    resumed.load_state_dict(torch.load(buffer))
    resumed.setup("cpu")
    assert resumed.state_dict() == state and resumed.calibration["mean"] == 0.3125
    assert torch.allclose(resumed.score(PROMPTS, RESPONSES, []), first.score(PROMPTS, RESPONSES, []))


def test_held_out_for_a_package_rm_is_read_at_load(rm_path, tmp_path, monkeypatch):
    good = exported_rm(rm_path, tmp_path / "good", {"held_out": HELD_OUT_STATS})
    bare = exported_rm(rm_path, tmp_path / "bare")
    for module, folder in (("fake_rm_good", good), ("fake_rm_bare", bare)):
        fake = types.ModuleType(module)
        fake.get_model_path = lambda folder=folder: folder
        monkeypatch.setitem(sys.modules, module, fake)
    c = RewardModelConstraint(threshold=0.0, model_name_or_path="pkg:fake_rm_good", calibration="held_out")
    assert c.calibration is None and c.state_dict() == {} and c.scale == 1.0
    c.setup("cpu")
    assert c.state_dict()["calibration"] == {"mean": 0.3125, "std": 0.625, "source": str(good / FORMAT_FILE)}
    missing = RewardModelConstraint(threshold=0.0, model_name_or_path="pkg:fake_rm_bare", calibration="held_out", name="rm")
    with pytest.raises(ConstraintConfigError, match=rf"^constraint 'rm': calibration: held_out needs {bare / FORMAT_FILE} .* got none$"):
        missing.setup("cpu")


def test_calibration_annotation_parses_with_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RewardModelConstraint, "rm")
    base = ["--rm.threshold", "0.45", "--rm.model_name_or_path", "x"]
    assert parser.parse_args([*base, "--rm.calibration", "held_out"]).rm.calibration == "held_out"
    assert parser.parse_args([*base, "--rm.calibration", "{mean: 0.5, std: 2.0}"]).rm.calibration == {"mean": 0.5, "std": 2.0}
    with pytest.raises(Exception):
        parser.parse_args([*base, "--rm.calibration", "heldout"])


def test_cli_config_with_held_out_parses(tmp_path, capfd):
    import warnings

    import yaml

    from l3m_lightning.cli import main

    config = tmp_path / "held_out.yaml"
    config.write_text(
        "model:\n  constraints:\n    - name: harmlessness\n      model_name_or_path: runs/rm/hf_model\n"
        "      calibration: held_out\n      threshold: 0.45\n      scale: 2.0\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as caught:
            main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(config), "--print_config"])
    assert caught.value.code in (0, None)
    constraint = yaml.safe_load(capfd.readouterr().out)["model"]["constraints"][0]
    assert constraint["calibration"] == "held_out" and constraint["threshold"] == 0.45
