"""2-process CPU runs (gloo) under DDP and FSDP2 (ModelParallelStrategy + fully_shard), as subprocesses.

* λ_i is identical on both ranks at every step, and equals the λ_i one process computes from the
  union of both ranks' samples (Ĉ_i sums and sample counts all-reduced before λ is read off).
* FSDP2 on one process (a laptop dry run of a multi-GPU config) still gathers for export.
* FSDP2: sharded checkpoints resume with the same μ; the exported ``save_pretrained`` model holds the
  full (gathered) weights, loads with ``AutoModelForCausalLM`` and equals the checkpoint's weights.

Each rank's per-step statistics are dumped by ``tests/_dist_callbacks.LambdaDump``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l3m_lightning.estimator import constraint_multipliers, masked_mean

# every test here fits in subprocesses (slow); all but the one-process FSDP2 test spawn two ranks (distributed)
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}"
CONSTRAINTS = (
    "[{name: length, sense: at_most, threshold: 10, scale: 10},"
    " {name: reward_function, function: _dist_callbacks.token_mix, threshold: 0.9, sense: at_most, scale: 1.0}]"
)
FSDP2 = "{class_path: lightning.pytorch.strategies.ModelParallelStrategy, init_args: {data_parallel_size: 2, tensor_parallel_size: 1}}"


def _fit(tmp_path: Path, strategy: str, *args: str, devices: int = 2) -> subprocess.CompletedProcess:
    runs = tmp_path / "runs"
    cmd = [
        sys.executable, str(ROOT / "cli.py"), "fit",
        "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy", strategy,
        "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.policy.config", TINY_MODEL, "--model.constraints", CONSTRAINTS,
        "--model.sampling.max_new_tokens", "6", "--model.sampling.num_samples", "2",
        "--model.barrier.mu_decay", "0.5", "--model.barrier.mu_decay_every", "1", "--model.barrier.mu_floor", "0.001",
        "--model.multipliers.ema", "0.0",  # λ is checked against B'(Ĉ of the union) directly
        "--data.batch_size", "4", "--data.embedded_num_prompts", "80", "--data.max_val_rows", "4",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.callbacks.init_args.dirpath", str(runs / "ckpt"),
        "--trainer.callbacks.init_args.every_n_train_steps", "2",
        "--trainer.callbacks+=_dist_callbacks.LambdaDump",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _dumps(out_dir: Path) -> tuple[list[dict], list[dict]]:
    return tuple(json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    _fit(tmp_path, "ddp", "--trainer.max_steps", "3", "--trainer.callbacks.init_args.out_dir", str(tmp_path / "dump"))
    return tmp_path


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    """4 steps under FSDP2 (checkpoints at 2 and 4, validation at 4), then `--ckpt_path last` to step 6."""
    tmp_path = tmp_path_factory.mktemp("fsdp2")
    _fit(tmp_path, FSDP2, "--trainer.max_steps", "4", "--trainer.callbacks.init_args.out_dir", str(tmp_path / "dump"),
         "--model.sampling.generation_batch_size", "3",  # 8 rows per rank, decoded 2 at a time
         "--model.value_baseline.enabled", "true")  # its head is sharded too, and resumes
    meta_first = torch.load(tmp_path / "runs" / "ckpt" / "last.ckpt" / "meta.pt", weights_only=False)
    weights_first = _checkpoint_weights(tmp_path / "runs" / "ckpt" / "last.ckpt", tmp_path / "full_first.pt")
    _fit(tmp_path, FSDP2, "--trainer.max_steps", "6", "--ckpt_path", "last", "--model.value_baseline.enabled", "true",
         "--trainer.callbacks.init_args.out_dir", str(tmp_path / "dump_resumed"))
    meta_second = torch.load(tmp_path / "runs" / "ckpt" / "last.ckpt" / "meta.pt", weights_only=False)
    return tmp_path, meta_first, weights_first, meta_second


def _checkpoint_weights(sharded_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """The policy weights of a sharded (torch.distributed.checkpoint) Lightning checkpoint, gathered offline."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(sharded_dir, out)
    state = torch.load(out, weights_only=False)["state_dict"]
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def _check_lambda_against_union(rank0: list[dict], rank1: list[dict], min_steps: int = 3) -> None:
    assert len(rank0) == len(rank1) >= min_steps
    local_differs = False
    for r0, r1 in zip(rank0, rank1):
        assert r0["world_size"] == r1["world_size"] == 2
        assert r0["step"] == r1["step"] and r0["mu"] == r1["mu"]
        # identical on both ranks, bit for bit
        assert r0["multipliers"] == r1["multipliers"], f"step {r0['step']}: λ differs across ranks"
        assert r0["estimates"] == r1["estimates"]
        costs = torch.cat([torch.tensor(r0["costs"], dtype=torch.float64), torch.tensor(r1["costs"], dtype=torch.float64)], dim=1)
        valid = torch.cat([torch.tensor(r0["valid"]), torch.tensor(r1["valid"])], dim=1)
        union = torch.stack([masked_mean(costs[i], valid[i]) for i in range(costs.shape[0])])
        expected = constraint_multipliers(union, r0["mu"])
        torch.testing.assert_close(torch.tensor(r0["estimates"], dtype=torch.float64), union, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.tensor(r0["multipliers"], dtype=torch.float64), expected, rtol=1e-9, atol=1e-12)
        for r in (r0, r1):  # the rank-local estimate is not the union's somewhere, so the check has teeth
            c, v = torch.tensor(r["costs"], dtype=torch.float64), torch.tensor(r["valid"])
            local = torch.stack([masked_mean(c[i], v[i]) for i in range(c.shape[0])])
            local_differs |= not torch.allclose(local, union, rtol=1e-6, atol=1e-9)
    assert local_differs, "rank-local and union estimates coincide at every step: the test cannot tell them apart"


@pytest.mark.distributed
def test_ddp_lambda_identical_across_ranks_and_equal_to_union(ddp_run):
    rank0, rank1 = _dumps(ddp_run / "dump")
    assert rank0[0]["strategy"] == "DDPStrategy" and not rank0[0]["sharded"]
    assert all(r["scored_logits_only"] for r in rank0 + rank1)  # the ranks agreed on the output-layer check
    _check_lambda_against_union(rank0, rank1)


@pytest.mark.distributed
def test_fsdp2_lambda_identical_across_ranks_and_equal_to_union(fsdp2_run):
    tmp_path = fsdp2_run[0]
    rank0, rank1 = _dumps(tmp_path / "dump")
    assert rank0[0]["strategy"] == "ModelParallelStrategy" and rank0[0]["sharded"] and rank1[0]["sharded"]
    assert not any(r["scored_logits_only"] for r in rank0 + rank1)  # sharded parameters keep the full logits
    _check_lambda_against_union(rank0, rank1)


@pytest.mark.distributed
def test_fsdp2_sampling_gathers_each_block_once_per_step(fsdp2_run, ddp_run):
    """Without the gather, each of the 4 micro-batches x up to 7 forwards would all-gather every block."""
    for r in _dumps(fsdp2_run[0] / "dump")[0] + _dumps(fsdp2_run[0] / "dump")[1]:
        assert r["fsdp_modules"] == 2 and r["sampled_rows"] == 8  # one decoder block + the root
        assert r["generation_all_gathers"] == r["fsdp_modules"], r
    assert all(r["generation_all_gathers"] == 0 for r in _dumps(ddp_run / "dump")[0])


@pytest.mark.distributed
def test_fsdp2_resume_continues_with_the_same_mu(fsdp2_run):
    tmp_path, meta_first, _, meta_second = fsdp2_run
    assert meta_first["global_step"] == 4 and meta_second["global_step"] == 6
    assert meta_first["l3m"]["mu_schedule"] == {"mu": pytest.approx(0.5**4), "steps": 4}
    assert meta_second["l3m"]["mu_schedule"] == {"mu": pytest.approx(0.5**6), "steps": 6}
    resumed0, resumed1 = _dumps(tmp_path / "dump_resumed")
    assert [r["step"] for r in resumed0] == [5, 6]
    assert resumed0[0]["mu"] == resumed1[0]["mu"] == pytest.approx(0.5**4), "resumed run did not start from the checkpoint's μ"
    _check_lambda_against_union(resumed0, resumed1, min_steps=2)


@pytest.mark.distributed
def test_fsdp2_export_gathers_the_full_model(fsdp2_run):
    tmp_path, _, weights_first, _ = fsdp2_run
    from transformers import AutoModelForCausalLM

    export = tmp_path / "runs" / "quickstart" / "version_0" / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    exported = model.state_dict()
    assert exported["model.embed_tokens.weight"].shape == (model.config.vocab_size, 32)
    assert exported["model.layers.0.mlp.up_proj.weight"].shape == (64, 32)
    # the export of the first run is its final (step 4) weights, i.e. what its last checkpoint holds
    for key, value in weights_first.items():
        torch.testing.assert_close(exported[key], value.to(exported[key].dtype), msg=lambda m: f"{key}: {m}")


@pytest.mark.distributed
def test_fsdp2_checkpoint_holds_the_trained_value_head(fsdp2_run):
    state = torch.load(fsdp2_run[0] / "full_first.pt", weights_only=False)["state_dict"]
    weight = state["objective.value_head.linear.weight"]
    assert weight.shape == (2, 33) and weight.abs().sum() > 0  # 2 constraints; hidden 32 + position; moved off its zero init


@pytest.mark.distributed
def test_ddp_constraint_warmup_with_a_value_head(tmp_path):
    """Warm-up steps leave the value head unused; DDP (no ``find_unused_parameters``) must still reduce it."""
    _fit(tmp_path, "ddp", "--trainer.max_steps", "4", "--trainer.callbacks.init_args.out_dir", str(tmp_path / "dump"),
         "--model.value_baseline.enabled", "true", "--model.barrier.warmup_steps", "2")
    rank0, rank1 = _dumps(tmp_path / "dump")
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [3, 4]  # constrained from the third step
    assert [r["mu"] for r in rank0] == [1.0, 0.5]  # the μ schedule starts when the constraints do (decay 0.5 per step)


def test_one_process_fsdp2_exports_a_loadable_model(tmp_path):
    """One rank still holds DTensors: the export must gather them, not save the model's own state dict."""
    from transformers import AutoModelForCausalLM

    one_rank = FSDP2.replace("data_parallel_size: 2", "data_parallel_size: 1")
    _fit(tmp_path, one_rank, "--trainer.max_steps", "2", "--trainer.callbacks.init_args.out_dir", str(tmp_path / "dump"),
         "--model.value_baseline.enabled", "true", "--model.barrier.warmup_steps", "1", devices=1)  # the head's warm-up call, sharded
    assert [r["step"] for r in json.loads((tmp_path / "dump" / "rank0.json").read_text())] == [2]  # step 1 was warm-up
    export = tmp_path / "runs" / "quickstart" / "version_0" / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(export)
    state = model.state_dict()
    assert state["model.layers.0.mlp.up_proj.weight"].shape == (64, 32)
    assert all(torch.isfinite(v).all() for v in state.values())
