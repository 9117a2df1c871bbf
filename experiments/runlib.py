"""Shared by compare_methods.py and sweep.py: one training run = fit + held-out test + log statistics.

A run is described by a *spec* (method, its option, the length threshold, the step budget); it is
trained in its own process (so several can run side by side with one thread each), tested on the
held-out prompts, and summarised in ``<runs>/<name>/row.json``. A run whose ``row.json`` holds the
same spec is reused instead of retrained, so the sweep picks up compare_methods' runs and vice versa.

    python experiments/runlib.py SPEC.json     # one run (what the scripts launch per run)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = RESULTS / "runs"
CONFIG = ROOT / "configs" / "length-concise.yaml"
SCALE = 10.0  # the length constraint's scale in length-concise.yaml, kept for every threshold
# The barrier settings the recorded comparison, sweep and harmlessness tables were measured with, before
# the length configs gained a 200-step constraint warm-up and a μ floor of 0.15 (a 150-step run would
# end inside that warm-up).
PRE_WARMUP_BARRIER = ["--model.constraint_warmup_steps", "0", "--model.mu_floor", "0.1"]

LAMBDA, VALUE, SATISFIED, MU, LENGTH = (
    "constraints/length/lambda", "constraints/length/value", "constraints/length/satisfied", "barrier/mu",
    "completions/mean_length")


# --- specs ------------------------------------------------------------------------------------------
def make_spec(method: str, threshold: float = 10.0, sense: str = "at_most", dual_lr: float | None = None,
              penalty_weight: float | None = None, max_steps: int = 150, eval_rows: int = 256) -> dict[str, Any]:
    """A run of configs/length-concise.yaml with one method and length threshold."""
    if method == "lagrangian" and dual_lr is None or method == "penalty" and penalty_weight is None:
        raise ValueError(f"{method} needs {'dual_lr' if method == 'lagrangian' else 'penalty_weight'}")
    setting = f"-lr{dual_lr:g}" if method == "lagrangian" else f"-w{penalty_weight:g}" if method == "penalty" else ""
    name = f"{method}{setting}-{sense}{threshold:g}"
    return {"name": name, "method": method, "threshold": float(threshold), "sense": sense, "dual_lr": dual_lr,
            "penalty_weight": penalty_weight, "max_steps": int(max_steps), "eval_rows": int(eval_rows),
            "config": str(CONFIG.relative_to(ROOT))}


def setting_label(spec: dict[str, Any]) -> str:
    if spec["method"] == "lagrangian":
        return f"dual_lr={spec['dual_lr']:g}"
    if spec["method"] == "penalty":
        return f"w={spec['penalty_weight']:g}"
    return "μ 1→0.1"


def cli_args(spec: dict[str, Any], runs: Path) -> list[str]:
    n = spec["max_steps"]
    constraint = {"name": "length", "sense": spec["sense"], "threshold": spec["threshold"], "scale": SCALE}
    args = [
        "fit", "--config", str(ROOT / spec["config"]),
        "--trainer.max_steps", str(n),
        "--trainer.log_every_n_steps", "1",          # every step: first feasible step and λ oscillation are exact
        "--trainer.limit_val_batches", "0",          # held-out numbers come from the test after fit
        "--trainer.val_check_interval", str(n),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.logger.init_args.name", spec["name"],
        "--trainer.callbacks.init_args.dirpath", str(runs / spec["name"] / "checkpoints"),
        "--trainer.callbacks.init_args.every_n_train_steps", str(n),
        "--data.max_val_rows", str(spec["eval_rows"]),
        "--model.export_dir", "",
        "--model.constraints", json.dumps([constraint]),
        "--model.method", spec["method"],
        # the recorded comparison and sweep tables were measured before the value baseline existed
        "--model.value_baseline", "false", "--model.eval_num_samples", "1",
        *PRE_WARMUP_BARRIER,
    ]
    if spec["method"] == "lagrangian":
        args += ["--model.dual_lr", str(spec["dual_lr"])]
    if spec["method"] == "penalty":
        args += ["--model.penalty_weights", json.dumps([spec["penalty_weight"]])]
    return args


# --- one run (in its own process) -------------------------------------------------------------------
def train_and_test(spec: dict[str, Any], runs: Path) -> dict[str, Any]:
    from l3m_lightning.cli import main

    shutil.rmtree(runs / spec["name"], ignore_errors=True)  # one version per run name
    start = time.time()
    cli = main(cli_args(spec, runs))
    fit_seconds = time.time() - start
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    log_dir = Path(cli.trainer.log_dir)
    report = json.loads((log_dir / "report.json").read_text())
    base = "test/constraints/length"
    row = {
        "name": spec["name"], "spec": spec, "log_dir": str(log_dir.relative_to(ROOT) if log_dir.is_relative_to(ROOT) else log_dir),
        "fit_seconds": round(fit_seconds, 1), "test_seconds": round(time.time() - start - fit_seconds, 1),
        "test_ppl": metrics["test/ppl"],
        "test_length": {"mean": metrics[f"{base}/reward"], "low": metrics[f"{base}/reward_ci_low"],
                        "high": metrics[f"{base}/reward_ci_high"], "n": report["constraints"][0]["reward"]["n"]},
        "holds": report["constraints"][0]["holds"],
        "holds_with_95_confidence": report["constraints"][0]["holds_with_95_confidence"],
    }
    row.update(training_stats(log_dir, spec["max_steps"]))
    return row


def run_specs(specs: Sequence[dict[str, Any]], runs: Path = RUNS, jobs: int = 2, reuse: bool = True) -> list[dict[str, Any]]:
    """Train (or reuse) each spec; ``jobs`` processes side by side, one thread each when ``jobs > 1``."""
    runs.mkdir(parents=True, exist_ok=True)
    todo, rows = [], {}
    for spec in specs:
        cached = load_row(runs, spec) if reuse else None
        if cached is not None:
            print(f"[reuse] {spec['name']}: {runs / spec['name'] / 'row.json'}", flush=True)
            rows[spec["name"]] = cached
        else:
            todo.append(spec)
    threads = "1" if jobs > 1 else os.environ.get("OMP_NUM_THREADS", "2")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}

    def launch(spec: dict[str, Any]) -> dict[str, Any]:
        spec_path = runs / f"{spec['name']}.spec.json"
        spec_path.write_text(json.dumps(spec))
        log = runs / f"{spec['name']}.log"
        print(f"[start] {spec['name']} (log: {log})", flush=True)
        with open(log, "w") as fh:
            rc = subprocess.call([sys.executable, __file__, str(spec_path), str(runs)], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        if rc != 0:
            raise RuntimeError(f"run {spec['name']} failed (exit {rc}): see {log}")
        row = load_row(runs, spec)
        print(f"[done]  {spec['name']}: fit {row['fit_seconds']:.0f}s, test {row['test_seconds']:.0f}s", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for row in pool.map(launch, todo):
            rows[row["name"]] = row
    return [rows[s["name"]] for s in specs]


def load_row(runs: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    path = runs / spec["name"] / "row.json"
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    return row if row.get("spec") == spec else None


# --- statistics from the TensorBoard event files ----------------------------------------------------
def read_scalars(log_dir: str | Path, tags: Iterable[str] = (LAMBDA, VALUE, SATISFIED, MU, LENGTH)) -> dict[str, tuple[list[int], list[float]]]:
    """``{tag: (steps, values)}`` from a run's event files, with TensorBoard's EventAccumulator (no down-sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    present = set(acc.Tags()["scalars"])
    out = {}
    for tag in tags:
        if tag in present:
            events = sorted(acc.Scalars(tag), key=lambda e: e.step)
            out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def first_feasible_step(steps: Sequence[int], values: Sequence[float]) -> int | None:
    """1-based number of the first training step whose batch estimate Ĉ was ≤ 0 (TensorBoard step + 1), or None."""
    return next((s + 1 for s, v in zip(steps, values) if v <= 0), None)


def oscillation(values: Sequence[float], tol: float = 1e-9) -> dict[str, float]:
    """Mean and std of λ, and how often Δλ changes sign (steps with |Δλ| ≤ tol are skipped)."""
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "sign_changes": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    signs = [1 if b - a > tol else -1 for a, b in zip(values, values[1:]) if abs(b - a) > tol]
    return {"mean": mean, "std": std, "sign_changes": sum(1 for a, b in zip(signs, signs[1:]) if a != b)}


def training_stats(log_dir: str | Path, max_steps: int) -> dict[str, Any]:
    """First feasible step, and over the last half of training: λ's mean/std/sign changes of Δλ, feasible fraction."""
    scalars = read_scalars(log_dir)
    half = max_steps // 2
    steps, lam = scalars[LAMBDA]
    last = [v for s, v in zip(steps, lam) if s >= half]
    osc = oscillation(last)
    v_steps, values = scalars[VALUE]
    sat = [v for s, v in zip(*scalars[SATISFIED]) if s >= half]
    lengths = [v for s, v in zip(*scalars[LENGTH]) if s >= half]
    return {
        "first_feasible_step": first_feasible_step(v_steps, values),
        "logged_steps": len(v_steps),
        "lambda_last_half": {"mean": osc["mean"], "std": osc["std"], "sign_changes": osc["sign_changes"], "steps": len(last)},
        "lambda_max": max(lam) if lam else math.nan,
        "feasible_fraction_last_half": sum(sat) / len(sat) if sat else math.nan,
        "train_length_last_half": sum(lengths) / len(lengths) if lengths else math.nan,
    }


# --- pictures -------------------------------------------------------------------------------------
def plot_run(row: dict[str, Any], path: Path | None = None):
    """λ, μ and the sampled mean length over training for one run; saved as PNG when ``path`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = row["spec"]
    scalars = read_scalars(ROOT / row["log_dir"])
    fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True)
    axes[0].plot(*scalars[LAMBDA], color="tab:red", lw=1)
    axes[0].set_ylabel("λ (length)")
    axes[0].set_yscale("symlog", linthresh=0.1)
    mu_note = "" if spec["method"] == "barrier" else " (logged, unused by this method)"
    axes[1].plot(*scalars[MU], color="tab:blue", lw=1)
    axes[1].set_ylabel("μ")
    axes[1].set_title(f"barrier μ{mu_note}", fontsize=9)
    axes[2].plot(*scalars[LENGTH], color="tab:gray", lw=0.8, label="sampled mean length (train batch)")
    axes[2].axhline(spec["threshold"], color="k", ls="--", lw=1, label=f"threshold {spec['threshold']:g}")
    first = row.get("first_feasible_step")
    if first:
        for ax in axes:
            ax.axvline(first - 1, color="tab:green", ls=":", lw=1)
        axes[2].plot([], [], color="tab:green", ls=":", label=f"first Ĉ ≤ 0 (step {first})")
    axes[2].set_ylabel("tokens")
    axes[2].set_xlabel("training step")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{row['name']}: {spec['method']} {setting_label(spec)}, length {'≤' if spec['sense'] == 'at_most' else '≥'} {spec['threshold']:g}")
    fig.tight_layout()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


if __name__ == "__main__":
    spec_file, runs_dir = Path(sys.argv[1]), Path(sys.argv[2])
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments from cli_args only
    the_spec = json.loads(spec_file.read_text())
    result = train_and_test(the_spec, runs_dir)
    (runs_dir / the_spec["name"] / "row.json").write_text(json.dumps(result, indent=2))


def run_children(commands: dict[str, list[str]], out_dir: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Start one process per named command (each writes ``out_dir/row-<name>.json``), wait, return the rows.

    Each child's output goes to ``out_dir/<name>.log``; a failed child stops the whole table.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for name, cmd in commands.items():
        row_json = out_dir / f"row-{name}.json"
        row_json.unlink(missing_ok=True)
        log = open(out_dir / f"{name}.log", "w")
        procs.append((name, row_json, subprocess.Popen([*cmd, "--row-json", str(row_json)], env=env, stdout=log, stderr=subprocess.STDOUT)))
    rows = []
    for name, row_json, proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"run {name} failed: see {out_dir / (name + '.log')}")
        rows.append(json.loads(row_json.read_text()))
    return rows
