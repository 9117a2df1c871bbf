"""The benches still run against the current code: bench/step_time.py (one tiny timed step), bench/vs_trl.py
(a tiny model through both tools; skipped without trl), the decode-kernels and scored-logits benches, and
bench/gpu_check.sh as a CPU dry run (its preflight too). No targets or timings are checked."""

import argparse
import importlib.util
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_time_bench_runs_one_tiny_step(single_thread):
    spec = importlib.util.spec_from_file_location("step_time", ROOT / "bench" / "step_time.py")
    step_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_time)
    step_time.CONFIGS["tiny"] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
    args = argparse.Namespace(batch_size=2, num_samples=2, max_new_tokens=4, steps=1, warmup=0, device="cpu", dtype="float32",
                              decoder="lean", gradient_clip_val=1.0, fit_steps=2, cudnn_attention=False)
    row = step_time.run_one("tiny", args)
    forwards = {f"fwd_bwd_{kind}_{k}" for kind in ("shared", "packed", "padded") for k in ("full", "varied")}
    expected = {"sft_step", "sampling", "forward", "objective", "backward", "optimizer", "l3m_step", "l3m_step_padded", "bare_decode",
                "sampling_lean", "sampling_lean_cuda_graphs", "sampling_generate", *forwards}
    assert expected <= set(row["ms"]) and all(v > 0 for v in row["ms"].values())
    assert row["sampled_tokens"] == 2 * 2 * 4  # every row runs to max_new_tokens while timing
    row.update(step_time.fit_step_time("tiny", args))  # the same step under cli.py fit, timed by StepTimer
    assert row["fit_steps_timed"] == 2 and row["fit_step_ms"] > 0
    slower = {**row, "ms": {k: 3 * v for k, v in row["ms"].items()}, "fit_step_ms": 2 * row["fit_step_ms"]}
    merged = step_time.merge_rounds([row, slower, slower])  # --rounds 3: medians over the rounds, each round's ratio kept
    assert merged["ms"]["l3m_step"] == slower["ms"]["l3m_step"] and merged["fit_step_ms"] == slower["fit_step_ms"]
    assert merged["fit_over_bench_by_round"][0] == pytest.approx(row["fit_step_ms"] / row["ms"]["l3m_step"])
    assert merged["fit_over_bench"] == pytest.approx(2 / 3 * merged["fit_over_bench_by_round"][0])
    assert merged["lean_over_generate_throughput"] == pytest.approx(row["lean_over_generate_throughput"])
    assert "tiny" in step_time.table([merged])


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_vs_trl_bench_runs_both_tools_on_a_tiny_model(tmp_path):
    """bench/vs_trl.py end to end on a tiny model: L3M's real CLI fit and TRL's GRPOTrainer, lengths pinned, JSON written."""
    pytest.importorskip("trl")
    vs_trl = _load_bench("vs_trl")
    vs_trl.CONFIGS["tiny"] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
    out = tmp_path / "vs_trl.json"
    result = vs_trl.main(["--configs", "tiny", "--max-new-tokens", "4", "--steps", "2", "--untimed", "1", "--repeats", "1",
                          "--variants", "l3m,trl", "--rows", "16", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    (row,) = result["rows"]
    assert set(row["tools"]) == {"l3m", "trl"}
    for tool in row["tools"].values():
        assert tool["lengths_pinned"] and tool["timed_steps"] == 1
        assert len(tool["runs"][0]["step_s"]) == 2
    (ratio,) = row["tools"]["l3m"]["throughput_vs_trl_by_round"]
    assert ratio == row["tools"]["trl"]["per_run_median_step_s"][0] / row["tools"]["l3m"]["per_run_median_step_s"][0]
    trl_run = row["tools"]["trl"]["runs"][0]
    assert trl_run["prompt_ids_match"] and trl_run["generation_config"]["min_new_tokens"] == 4
    assert trl_run["model_dtype"] == "torch.float32"
    floors = row["floors"]["s"]
    assert set(floors) == {"bare_decode", "lean_decode", "fwd_bwd", "optimizer"}
    assert row["floors"]["bare_step_s"] == min(floors["bare_decode"], floors["lean_decode"]) + floors["fwd_bwd"] + floors["optimizer"]
    saved = json.loads(out.read_text())
    assert saved["meta"]["versions"]["trl"] and saved["parity"] and "TRL GRPO" in saved["table"]


def test_decode_kernels_bench_times_both_matmuls_both_draws_and_both_picks(tmp_path, monkeypatch):
    """bench/decode_kernels.py end to end on small shapes: each shape's kernel choice is the decode step's, JSON written."""
    bench = _load_bench("decode_kernels")
    if not bench.decoding.onednn_available():
        pytest.skip("this torch build has no oneDNN matmul")
    monkeypatch.setattr(bench, "SHAPES", (("large", 600, 600, 2), ("small", 64, 64, 2)))
    monkeypatch.setattr(bench, "VOCABS", ((64, 2), (bench.decoding.FLAT_CDF_MAX_VOCAB + 1, 2)))
    monkeypatch.setattr(bench, "LOGITS", (("small", 2, 3, 64),))
    out = tmp_path / "kernels.json"
    result = bench.main(["--rows", "4", "--repeats", "2", "--out", str(out)])
    assert [r["chosen"] for r in result["matmuls"]] == ["oneDNN", "F.linear"]
    assert [r["chosen"] for r in result["draws"]] == ["one CDF", f"blocks of {bench.decoding.CDF_BLOCK}"]
    assert all(r["f_linear_us"] > 0 and r["onednn_us"] > 0 for r in result["matmuls"])
    assert [r["shape"] for r in result["picks"]] == [[2, 3, 64]] and result["picks"][0]["index_select_us"] > 0
    assert [r["vocab"] for r in result["hold_back"]] == [64, bench.decoding.FLAT_CDF_MAX_VOCAB + 1]
    assert all(r["processor_us"] > 0 and r["index_fill_us"] > 0 for r in result["hold_back"])
    assert json.loads(out.read_text())["table"] == result["table"]


def test_scored_logits_bench_scores_each_batch_both_ways(tmp_path, monkeypatch, single_thread):
    """bench/scored_logits.py end to end on a tiny model: both ways give the same log-probabilities, JSON written."""
    bench = _load_bench("scored_logits")
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
    monkeypatch.setitem(bench.MODELS, "tiny", {"module": {"policy": {"config": tiny}, "sampling": {"num_samples": 2, "max_new_tokens": 4}},
                                               "data": {"batch_size": 2, "embedded_num_prompts": 40, "max_val_rows": 4}})
    out = tmp_path / "scored.json"
    result = bench.main(["--models", "tiny", "--batches", "2", "--rounds", "2", "--out", str(out)])
    (row,) = result["rows"]
    assert row["passes_each"] == 4 and row["scored_only_s"] > 0 and row["every_position_s"] > 0
    assert row["max_logp_difference"] < 1e-5 and len(row["sample_lengths"]) == 2
    assert json.loads(out.read_text())["table"] == result["table"]


def _gpu_check(tmp_path, **env) -> subprocess.CompletedProcess:
    """bench/gpu_check.sh as a CPU dry run (its documented overrides), output under ``tmp_path``."""
    settings = {"ACCELERATOR": "cpu", "STRATEGY": "auto", "DEVICES": "1", "SAMPLER_CONFIG": "embedded", "BATCH": "2",
                "NUM_SAMPLES": "2", "MAX_NEW_TOKENS": "4", "OUT": str(tmp_path / "gpu_check"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, **settings}, timeout=600)


def test_gpu_check_stops_at_a_hung_preflight_before_any_phase(tmp_path):
    """A preflight step that hangs is cut at PREFLIGHT_TIMEOUT and no phase runs (a lease is not spent on a phase's timeout)."""
    hung = tmp_path / "hung_python"  # starts, imports a module, then hangs in the next import
    hung.write_text("#!/bin/sh\necho 'import time:       812 |        812 | encodings' >&2\nsleep 60\n")
    hung.chmod(0o755)
    run = _gpu_check(tmp_path, PYTHON=str(hung), PREFLIGHT_TIMEOUT="2", PHASES="sampler")
    assert run.returncode == 1
    assert "preflight step failed or hung (> 2 s): import sys" in run.stdout
    assert "| encodings" in run.stdout  # the log's tail: where it got to
    assert "PHASE preflight: FAIL (no phase run)" in run.stdout and "=== phase" not in run.stdout


def _tiny_wheel(folder: Path) -> Path:
    """A pure-Python wheel of one module, ``l3m_wheel_probe``, as pip installs it."""
    name = "l3m_wheel_probe"
    path = folder / f"{name}-0.1-py3-none-any.whl"
    files = {f"{name}.py": "VALUE = 1\n",
             f"{name}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{name}-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{f},,\n" for f in files) + f"{name}-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for f, text in {**files, f"{name}-0.1.dist-info/RECORD": record}.items():
            wheel.writestr(f, text)
    return path


@pytest.mark.slow
def test_gpu_check_sampler_phase_dry_run_installs_wheels_and_passes(tmp_path):
    """The sampler and shapes phases end to end on CPU, with WHEELS installed by the preflight into OUT/site and put on the path."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _tiny_wheel(wheels)
    run = _gpu_check(tmp_path, WHEELS=str(wheels), PHASES="sampler shapes")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "=== preflight" in run.stdout and "accelerator cpu" in run.stdout and "datasets" in run.stdout
    assert (tmp_path / "gpu_check" / "site" / "l3m_wheel_probe.py").exists()
    assert "sampled tokens/s: lean" in run.stdout and "with model.sampling.cuda_graphs" in run.stdout and "PHASE sampler: PASS" in run.stdout
    (result,) = json.loads((tmp_path / "gpu_check" / "step_time.json").read_text())["results"]
    assert result["config"] == "embedded" and result["sampled_tokens"] == 2 * 2 * 4
    assert "PHASE shapes: PASS" in run.stdout  # each part on unseen shapes and again, cuDNN attention out and in
    for name, cudnn in (("fresh_shapes.json", False), ("fresh_shapes_cudnn.json", True)):
        shapes = json.loads((tmp_path / "gpu_check" / name).read_text())
        assert shapes["cudnn_attention"] is cudnn and len(shapes["ms"]["sampling/fresh"]) == len(shapes["ms"]["sampling/repeat"]) == 3


def test_fit_speed_with_natural_lengths_times_every_variant_and_reads_their_sampled_lengths(tmp_path):
    """bench/fit_speed.py on a tiny embedded config: real fit runs, lengths left to the model, each step's mean length read back."""
    import yaml

    bench = _load_bench("fit_speed")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "model": {"policy": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "num_key_value_heads": 2}},
                  "constraints": [{"name": "length", "threshold": 2, "scale": 4}], "sampling": {"num_samples": 2, "max_new_tokens": 6}},
        "data": {"batch_size": 2, "embedded_num_prompts": 40, "max_val_rows": 4}}))
    out = tmp_path / "fit_speed.json"
    result = bench.main(["--config", str(config), "--steps", "2", "--untimed", "1", "--natural-lengths",
                         "--variant", "padded=--model.policy.share_prompts false --model.policy.fused_forward false", "--out", str(out)])
    assert result["natural_lengths"] and set(result["step_s"]) == {"today", "padded"}
    for name in ("today", "padded"):
        assert len(result["step_s"][name]) == 2 and len(result["mean_sampled_length"][name]) == 2
        assert all(1 <= length <= 6 for length in result["mean_sampled_length"][name])
    assert "mean sampled length" in result["table"] and json.loads(out.read_text())["table"] == result["table"]


@pytest.mark.slow
def test_gpu_check_fit_phases_pass_as_a_cpu_dry_run(tmp_path):
    """throughput, resume and fsdp2 end to end on CPU with a tiny model in bf16-mixed, the check's own precision, and
    FIT_ARGS passed to every fit (here the fixed-window decode step of model.sampling.cuda_graphs, eager on CPU):
    what a GPU run would meet first (a refused clip, a stale assertion) fails here instead of on a lent machine."""
    tiny = "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 4}"
    run = _gpu_check(tmp_path, PHASES="throughput resume fsdp2", RESUME_STRATEGY="auto", MODEL_CONFIG=tiny, STEPS="8",
                     MAX_NEW_TOKENS="8", OMP_NUM_THREADS="2", FIT_ARGS="--model.sampling.cuda_graphs true")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    for phase in ("throughput", "resume", "fsdp2"):
        assert f"PHASE {phase}: PASS" in run.stdout
    assert "tokens/s (sampled)" in run.stdout and "matches 0.8^floor" in run.stdout
    report = json.loads((tmp_path / "gpu_check" / "throughput.json").read_text())
    assert report["tokens_per_s_sampled"] > 0 and 0 < report["sampling_seconds_per_step"] < report["seconds_per_step"]
    assert report["tokens_per_s_sampling"] > report["tokens_per_s_sampled"] and "sampled tokens/s while sampling" in run.stdout
    saved = [p.read_text() for p in (tmp_path / "gpu_check").rglob("config.yaml")]  # each fit's resolved config, as run
    assert len(saved) >= 4 and all("cuda_graphs: true" in text for text in saved)
