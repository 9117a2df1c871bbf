"""bench/step_time.py still runs against the current module (one tiny timed step, no targets checked)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_time_bench_runs_one_tiny_step(single_thread):
    spec = importlib.util.spec_from_file_location("step_time", ROOT / "bench" / "step_time.py")
    step_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_time)
    step_time.CONFIGS["tiny"] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
    args = argparse.Namespace(batch_size=2, num_samples=2, max_new_tokens=4, steps=1, warmup=0, device="cpu", dtype="float32")
    row = step_time.run_one("tiny", args)
    expected = {"sft_step", "sampling", "forward", "objective", "backward", "optimizer", "l3m_step", "l3m_step_two_pass", "bare_decode",
                "fwd_bwd_fused_full", "fwd_bwd_two_pass_full", "fwd_bwd_fused_varied", "fwd_bwd_two_pass_varied"}
    assert expected <= set(row["ms"]) and all(v > 0 for v in row["ms"].values())
    assert row["sampled_tokens"] == 2 * 2 * 4  # every row runs to max_new_tokens while timing
    assert "tiny" in step_time.table([row])
