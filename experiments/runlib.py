"""What every experiment script shares: frozen configs, one fit-and-test, child processes, run statistics.

* **Frozen configs** (``configs/experiments/``): each recorded table is measured from configs of its
  own, every setting written out (``frozen_config``, ``config_value``); a script sets on top only
  what says *where* (output folders, converted data) and what a table varies (a method, a threshold)
  or its user asked for (``--max-steps``, ``--override KEY=VALUE``).
* **One fit-and-test** (``fit_and_test``): ``cli.py fit --config C --KEY VALUE ...``, then
  ``trainer.test`` on the held-out split, timed; every script builds its table's row from the result.
* **Child processes** (``run_children``): one process per run, one thread each, each writing its row
  as JSON.
* **compare_methods.py and sweep.py's runs**: a run is a *spec* (method, its option, the length
  threshold, the step budget) on ``configs/experiments/compare_methods.yaml``, trained in its own
  process, tested on the held-out prompts and summarised in ``<runs>/<name>/row.json``; a run whose
  ``row.json`` holds the same spec is reused, so the sweep picks up compare_methods' runs and vice versa.

    python experiments/runlib.py SPEC.json RUNS --row-json ROW.json     # one spec run (what run_specs launches)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
RUNS = RESULTS / "runs"
FROZEN = ROOT / "configs" / "experiments"
CONFIG = FROZEN / "compare_methods.yaml"  # compare_methods.py and sweep.py: the run barrier-at_most10 in full

LAMBDA, VALUE, SATISFIED, MU, LENGTH = (
    "constraints/length/lambda", "constraints/length/value", "constraints/length/satisfied", "barrier/mu",
    "completions/mean_length")


# --- frozen configs and the settings put on top of them ------------------------------------------------
def frozen_config(name: str) -> Path:
    """``configs/experiments/<name>.yaml``, e.g. ``frozen_config("length_table/sft")``."""
    path = FROZEN / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no frozen config {path}")
    return path


@lru_cache(maxsize=None)
def _load(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def config_value(config: Path, key: str) -> Any:
    """The value of a dotted ``key`` (``model.sampling.num_samples``) in a config file."""
    value: Any = _load(Path(config))
    for part in key.split("."):
        value = value[part]
    return value


def flag_args(settings: Mapping[str, Any]) -> list[str]:
    """``{"trainer.max_steps": 150, "model.constraints": [...]}`` → ``["--trainer.max_steps", "150", "--model.constraints", "[...]"]``.

    Strings and paths go as they are; ``None`` as ``null``; everything else as JSON (``false``, ``[0.0]``).
    """
    args = []
    for key, value in settings.items():
        text = str(value) if isinstance(value, (str, Path)) else json.dumps(value)
        args += [f"--{key}", text]
    return args


def config_override(item: str) -> str:
    """An ``--override`` value: KEY=VALUE, e.g. ``model.barrier.mu_floor=0.1`` (an argparse ``type``)."""
    if "=" not in item or not item.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"--override expects KEY=VALUE such as model.barrier.mu_floor=0.1, got {item!r}")
    return item


def override_settings(items: Iterable[str]) -> dict[str, str]:
    """``["model.barrier.mu_floor=0.1"]`` → ``{"model.barrier.mu_floor": "0.1"}`` (later items win, as on the command line)."""
    return dict(item.split("=", 1) for item in items)


def output_settings(out: Path, name: str) -> dict[str, Any]:
    """A run's output folders: TensorBoard logs in ``out/<name>/version_N``, checkpoints in ``out/<name>/checkpoints``."""
    return {"trainer.logger.init_args.save_dir": out, "trainer.logger.init_args.name": name,
            "trainer.callbacks.init_args.dirpath": out / name / "checkpoints"}


def budget_settings(max_steps: int | None = None, eval_rows: int | None = None) -> dict[str, Any]:
    """A step budget (validated once, at its end) and a number of held-out prompts, each only when given."""
    settings: dict[str, Any] = {}
    if max_steps is not None:
        settings.update({"trainer.max_steps": max_steps, "trainer.val_check_interval": max_steps})
    if eval_rows is not None:
        settings["data.max_val_rows"] = eval_rows
    return settings


def check_settings(config: Path, settings: Mapping[str, Any], subcommand: str = "fit") -> None:
    """Parse ``cli.py SUBCOMMAND --config CONFIG`` with ``settings`` (nothing is built): a mistake, e.g. an
    ``--override`` with an old option name, stops the script now rather than in a child after other runs."""
    import contextlib
    import io

    from l3m_lightning.cli import main

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        try:
            main([subcommand, "--config", str(config), *flag_args(settings), "--print_config"])
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise SystemExit(f"{config.name} with {' '.join(flag_args(settings))}: see the error above") from None


# --- one fit and test ---------------------------------------------------------------------------------
@dataclass
class FitTest:
    """What ``fit_and_test`` returns: the CLI (trainer, model, data), the held-out metrics and the timings."""

    cli: Any
    metrics: dict[str, float]
    fit_seconds: float
    test_seconds: float

    @property
    def log_dir(self) -> Path:
        return Path(self.cli.trainer.log_dir)

    def report(self) -> dict[str, Any] | None:
        """The run's ``report.json`` (written after the test), or None."""
        path = self.log_dir / "report.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def timings(self) -> dict[str, float]:
        return {"fit_seconds": round(self.fit_seconds, 1), "test_seconds": round(self.test_seconds, 1)}


def fit_and_test(config: Path, settings: Mapping[str, Any] | None = None, *, subcommand: str = "fit", evaluate: str = "test",
                 fresh: Path | None = None, build: Any = None) -> FitTest:
    """``cli.py SUBCOMMAND --config CONFIG --KEY VALUE ...``, then ``trainer.<evaluate>`` on the held-out split.

    ``subcommand="test"`` only tests (an untrained model: no fit, ``fit_seconds`` 0, metrics from the
    test). ``fresh``: a folder removed first, so that stale checkpoints or versions do not mix in.
    ``build``: what turns the arguments into a ``LightningCLI`` (default ``l3m_lightning.cli.main``;
    the reward-model trainer passes its own, with ``evaluate="validate"``).
    """
    if build is None:
        from l3m_lightning.cli import main as build
    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
    start = time.time()
    with warnings.catch_warnings():  # "args parameter is intended to run from within Python": it is, on purpose
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        cli = build([subcommand, "--config", str(config), *flag_args(settings or {})])
    seconds = time.time() - start
    if subcommand != "fit":
        metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
        return FitTest(cli, metrics, fit_seconds=0.0, test_seconds=seconds)
    start = time.time()
    metrics = getattr(cli.trainer, evaluate)(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return FitTest(cli, metrics, fit_seconds=seconds, test_seconds=time.time() - start)


# --- Anthropic HH data for the policy ----------------------------------------------------------------
def save_hh_split(hh_file: Path, out_dir: Path, convert: Callable[[str, str], dict[str, Any] | None],
                  val_fraction: float = 0.2, split_seed: int = 0) -> tuple[int, int, int]:
    """HH chosen dialogues, split as the reward models were, each ``convert``ed → a ``DatasetDict`` {train, test} in ``out_dir``.

    The split is the one ``PreferenceDataModule`` makes for an RM (``train_test_split`` of all rows in
    file order, same fraction and seed), so held-out prompts are ones the RM never trained on.
    ``convert(chosen dialogue, where)`` returns the row to keep (its file row is added as ``row``) or
    None to drop it. Returns (train rows, test rows, dropped rows).
    """
    import gzip

    from datasets import Dataset, DatasetDict

    with gzip.open(hh_file, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    held = Dataset.from_dict({"i": list(range(len(rows)))}).train_test_split(test_size=val_fraction, seed=split_seed, shuffle=True)
    splits, dropped = {}, 0
    for name in ("train", "test"):
        kept = []
        for i in held[name]["i"]:
            row = convert(rows[i]["chosen"], f"{hh_file} row {i}: field 'chosen'")
            if row is None:
                dropped += 1
            else:
                kept.append({**row, "row": i})
        splits[name] = Dataset.from_list(kept)
    DatasetDict(splits).save_to_disk(str(out_dir))
    return len(splits["train"]), len(splits["test"]), dropped


# --- child processes -------------------------------------------------------------------------------------
def run_children(commands: dict[str, list[str]], out_dir: Path, env: dict[str, str], jobs: int | None = None,
                 row_json: Any = None) -> list[dict[str, Any]]:
    """Run one process per named command, ``jobs`` at a time (default: all), and return their rows in order.

    Each command gets ``--row-json PATH`` (default ``out_dir/row-<name>.json``; ``row_json(name)`` names
    another) and writes its row there as JSON; its output goes to ``out_dir/<name>.log``. A failed
    child stops the whole table.
    """
    out_dir.mkdir(parents=True, exist_ok=True)

    def launch(name: str) -> dict[str, Any]:
        path = row_json(name) if row_json else out_dir / f"row-{name}.json"
        path.unlink(missing_ok=True)
        log = out_dir / f"{name}.log"
        print(f"[start] {name} (log: {log})", flush=True)
        with open(log, "w") as fh:
            rc = subprocess.call([*commands[name], "--row-json", str(path)], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        if rc != 0:
            raise SystemExit(f"run {name} failed (exit {rc}): see {log}")
        print(f"[done]  {name}", flush=True)
        return json.loads(path.read_text())

    with ThreadPoolExecutor(max_workers=max(1, jobs or len(commands))) as pool:
        return list(pool.map(launch, commands))


# --- compare_methods.py and sweep.py: specs on configs/experiments/compare_methods.yaml -------------------
def make_spec(method: str, threshold: float | None = None, sense: str = "at_most", dual_lr: float | None = None,
              penalty_weight: float | None = None, max_steps: int | None = None, eval_rows: int | None = None) -> dict[str, Any]:
    """A run of ``CONFIG`` with one method and length threshold (threshold, steps, held-out rows: the config's by default)."""
    if method == "lagrangian" and dual_lr is None or method == "penalty" and penalty_weight is None:
        raise ValueError(f"{method} needs {'dual_lr' if method == 'lagrangian' else 'penalty_weight'}")
    threshold = config_value(CONFIG, "model.constraints")[0]["threshold"] if threshold is None else threshold
    max_steps = config_value(CONFIG, "trainer.max_steps") if max_steps is None else max_steps
    eval_rows = config_value(CONFIG, "data.max_val_rows") if eval_rows is None else eval_rows
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


def spec_settings(spec: dict[str, Any], runs: Path) -> dict[str, Any]:
    """What a spec sets on top of its frozen config: the run's output folders, length threshold and method."""
    config, name, n = ROOT / spec["config"], spec["name"], spec["max_steps"]
    constraint = {**config_value(config, "model.constraints")[0], "sense": spec["sense"], "threshold": spec["threshold"]}
    settings = {**output_settings(runs, name), "model.constraints": [constraint], "model.multipliers.method": spec["method"]}
    if n != config_value(config, "trainer.max_steps"):  # one checkpoint, at the end
        settings.update({**budget_settings(max_steps=n), "trainer.callbacks.init_args.every_n_train_steps": n})
    if spec["eval_rows"] != config_value(config, "data.max_val_rows"):
        settings.update(budget_settings(eval_rows=spec["eval_rows"]))
    if spec["method"] == "lagrangian":
        settings["model.multipliers.dual_lr"] = spec["dual_lr"]
    if spec["method"] == "penalty":
        settings["model.multipliers.penalty_weights"] = [spec["penalty_weight"]]
    return settings


def train_and_test(spec: dict[str, Any], runs: Path) -> dict[str, Any]:
    """One spec run: fit, test on the held-out prompts, the row (held-out length with its CI, training statistics)."""
    run = fit_and_test(ROOT / spec["config"], spec_settings(spec, runs), fresh=runs / spec["name"])  # one version per run name
    report, log_dir, base = run.report(), run.log_dir, "test/constraints/length"
    row = {
        "name": spec["name"], "spec": spec, "log_dir": str(log_dir.relative_to(ROOT) if log_dir.is_relative_to(ROOT) else log_dir),
        **run.timings(),
        "test_ppl": run.metrics["test/ppl"],
        "test_length": {"mean": run.metrics[f"{base}/reward"], "low": run.metrics[f"{base}/reward_ci_low"],
                        "high": run.metrics[f"{base}/reward_ci_high"], "n": report["constraints"][0]["reward"]["n"]},
        "holds": report["constraints"][0]["holds"],
        "holds_with_95_confidence": report["constraints"][0]["holds_with_95_confidence"],
    }
    row.update(training_stats(log_dir, spec["max_steps"]))
    return row


def run_specs(specs: Sequence[dict[str, Any]], runs: Path = RUNS, jobs: int = 2, reuse: bool = True) -> list[dict[str, Any]]:
    """Train (or reuse) each spec; ``jobs`` processes side by side, one thread each when ``jobs > 1``."""
    runs.mkdir(parents=True, exist_ok=True)
    rows, commands = {}, {}
    for spec in specs:
        cached = load_row(runs, spec) if reuse else None
        if cached is not None:
            print(f"[reuse] {spec['name']}: {runs / spec['name'] / 'row.json'}", flush=True)
            rows[spec["name"]] = cached
        else:
            spec_path = runs / f"{spec['name']}.spec.json"
            spec_path.write_text(json.dumps(spec))
            commands[spec["name"]] = [sys.executable, __file__, str(spec_path), str(runs)]
    threads = "1" if jobs > 1 else os.environ.get("OMP_NUM_THREADS", "2")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for row in run_children(commands, runs, env, jobs=jobs, row_json=lambda name: runs / name / "row.json"):
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
    parser = argparse.ArgumentParser(description="one spec run of compare_methods.py / sweep.py")
    parser.add_argument("spec", type=Path)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--row-json", type=Path, required=True)
    cli_args = parser.parse_args()
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments from fit_and_test only
    result = train_and_test(json.loads(cli_args.spec.read_text()), cli_args.runs)
    cli_args.row_json.parent.mkdir(parents=True, exist_ok=True)
    cli_args.row_json.write_text(json.dumps(result, indent=2))
