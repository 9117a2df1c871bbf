"""`python cli.py fit` on a tiny config, then `fit --ckpt_path last`: the run resumes with the same μ."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # four CLI runs in subprocesses: fit, resumed fit, test, predict

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config", str(ROOT / "configs" / "quickstart.yaml"),
    "--trainer.val_check_interval", "4",
    "--trainer.log_every_n_steps", "1",
    "--model.policy.config", "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}",
    "--model.sampling.max_new_tokens", "6",
    "--model.sampling.num_samples", "2",
    "--model.barrier.mu_decay", "0.5",
    "--model.barrier.mu_decay_every", "1",
    "--model.barrier.mu_floor", "0.001",
    "--data.batch_size", "4",
    "--data.embedded_num_prompts", "80",
    "--data.max_val_rows", "4",
    "--trainer.enable_progress_bar", "false",
]


def _cli(tmp_path: Path, *args: str, subcommand: str = "fit") -> subprocess.CompletedProcess:
    runs = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "cli.py"), subcommand, *TINY,
           "--trainer.logger.init_args.save_dir", str(runs),
           "--trainer.callbacks.init_args.dirpath", str(runs / "ckpt"),
           "--trainer.callbacks.init_args.every_n_train_steps", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    _cli(tmp_path, "--trainer.max_steps", "4")
    first = torch.load(tmp_path / "runs" / "ckpt" / "last.ckpt", weights_only=False)
    _cli(tmp_path, "--trainer.max_steps", "8", "--ckpt_path", "last")
    second = torch.load(tmp_path / "runs" / "ckpt" / "last.ckpt", weights_only=False)
    return tmp_path, first, second


def test_fit_logs_namespaced_metrics_and_exports_hf_model(resumed_run):
    tmp_path, first, _ = resumed_run
    version0 = tmp_path / "runs" / "quickstart" / "version_0"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(version0))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/sft_loss", "train/ppl", "val/ppl", "barrier/mu", "completions/mean_length",
                "constraints/length/value", "constraints/length/reward", "constraints/length/lambda",
                "constraints/length/satisfied", "val/constraints/length/value"]:
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    # the sampled text of step 0 (model.evaluation.log_samples_every_n_steps): add_text("samples") is the tensor tag samples/text_summary
    assert "samples/text_summary" in acc.Tags()["tensors"], f"sampled text not logged: tensor tags {acc.Tags()['tensors']}"
    text = acc.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**prompt:**" in text and "**response (" in text, text

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = version0 / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    assert model.config.hidden_size == 32 and tok.eos_token == "<|end|>"


def test_resume_continues_with_the_same_mu(resumed_run):
    tmp_path, first, second = resumed_run
    assert first["global_step"] == 4 and second["global_step"] == 8
    assert first["l3m"]["mu_schedule"] == {"mu": pytest.approx(0.5**4), "steps": 4}
    assert second["l3m"]["mu_schedule"] == {"mu": pytest.approx(0.5**8), "steps": 8}
    # The resumed process's first step uses the checkpoint's μ, not mu_start. (Its row at step 3 is the
    # checkpointed batch's own, which Lightning logs after the save: ExactResume logs it again, μ = 0.5**3.)
    resumed_mu = dict(_scalars(tmp_path / "runs" / "quickstart" / "version_1", "barrier/mu"))
    assert resumed_mu[4] == pytest.approx(0.5**4) and resumed_mu[3] == pytest.approx(0.5**3)
    assert second["optimizer_states"][0]["state"], "optimizer state restored and saved"


def test_test_and_predict_write_report_and_jsonl(resumed_run):
    import json

    tmp_path, _, _ = resumed_run
    _cli(tmp_path, "--ckpt_path", str(tmp_path / "runs" / "ckpt" / "last.ckpt"), subcommand="test")
    report_dir = tmp_path / "runs" / "quickstart" / "version_2"
    report = json.loads((report_dir / "report.json").read_text())
    assert report["split"] == "test" and report["global_step"] == 8 and report["ppl"] > 1
    (row,) = report["constraints"]
    assert row["constraint"] == "length" and row["reward"]["n"] == 4 and row["reward"]["low"] <= row["reward"]["mean"] <= row["reward"]["high"]
    assert "| length | <= 10 |" in (report_dir / "report.md").read_text()

    _cli(tmp_path, "--ckpt_path", str(tmp_path / "runs" / "ckpt" / "last.ckpt"), subcommand="predict")
    rows = [json.loads(line) for line in (tmp_path / "runs" / "quickstart" / "version_3" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(set(r) == {"prompt", "completion", "num_tokens"} for r in rows)
