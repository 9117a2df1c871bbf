"""The paper's comparison on the embedded default: barrier (L3M) vs lagrangian (MM) vs fixed penalty.

    python experiments/compare_methods.py --max-steps 150     # ~11 min on 2 CPU cores

Trains the frozen config configs/experiments/compare_methods.yaml (configs/length-concise.yaml,
mean answer length ≤ 10 tokens, with the settings this table was measured with, written out in
full) once per method and setting, all with the same step budget, seed and data: ``barrier``; ``lagrangian`` with each ``--dual-lrs``
(λ ← max(0, λ + η·Ĉ) from 0); ``penalty`` with each ``--penalty-weights``. Two runs at a time, one
thread each (``--jobs``). Per run it reports

* held-out perplexity and held-out mean length with its 95% CI (``trainer.test`` on the held-out
  prompts, one sample each: ``test/constraints/length/reward`` and ``..._ci_low`` / ``..._ci_high``);
* the first training step whose sampled batch satisfied the constraint (``constraints/length/value``
  ≤ 0, read from the TensorBoard event files, logged every step) and the fraction of feasible
  batches over the second half;
* how much λ oscillates over the second half: its mean and std, and the number of sign changes of Δλ.

Prints the table and writes experiments/results/compare_methods.{json,md} and
compare_methods_lambda.png (λ and sampled length of every run; needs ``pip install -e ".[plots]"``).
Runs live in experiments/results/runs/<name>/ (TensorBoard logs, report.json, row.json); a run whose
row.json matches its spec is reused (``--no-reuse`` retrains), which is how sweep.py shares them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runlib  # noqa: E402
from runlib import fmt  # noqa: E402


def specs_for(args: argparse.Namespace) -> list[dict]:
    common = {"threshold": args.threshold, "max_steps": args.max_steps, "eval_rows": args.eval_rows}
    specs = [runlib.make_spec("barrier", **common)]
    specs += [runlib.make_spec("lagrangian", dual_lr=lr, **common) for lr in args.dual_lrs]
    specs += [runlib.make_spec("penalty", penalty_weight=w, **common) for w in args.penalty_weights]
    return specs


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| run | method | setting | held-out ppl | held-out mean length (95% CI) | holds | holds (95% CI) "
        "| first step Ĉ ≤ 0 | feasible batches, 2nd half | λ mean ± std, 2nd half | Δλ sign changes, 2nd half | fit s |",
        "| --- | --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        spec, length, lam = r["spec"], r["test_length"], r["lambda_last_half"]
        lines.append(
            f"| {r['name']} | {spec['method']} | {runlib.setting_label(spec)} | {r['test_ppl']:.3f} "
            f"| {length['mean']:.2f} ({length['low']:.2f} – {length['high']:.2f}, n={length['n']}) "
            f"| {'yes' if r['holds'] else 'no'} | {'yes' if r['holds_with_95_confidence'] else 'no'} "
            f"| {r['first_feasible_step'] if r['first_feasible_step'] is not None else 'never'} "
            f"| {r['feasible_fraction_last_half']:.0%} | {fmt(lam['mean'], 3)} ± {fmt(lam['std'], 3)} "
            f"| {lam['sign_changes']} / {max(lam['steps'] - 2, 0)} | {r['fit_seconds']:.0f} |")
    return lines


def what_it_took(rows: list[dict]) -> list[str]:
    lines = []
    for method, option in (("lagrangian", "dual_lr"), ("penalty", "penalty_weight")):
        tried = [r for r in rows if r["spec"]["method"] == method]
        if not tried:
            continue
        parts = []
        for r in tried:
            first = r["first_feasible_step"]
            reached = f"first feasible batch at step {first}" if first is not None else "no feasible batch"
            parts.append(f"{option}={r['spec'][option]:g}: {reached}, {r['feasible_fraction_last_half']:.0%} of 2nd-half "
                         f"batches feasible, held-out mean length {r['test_length']['mean']:.2f} "
                         f"({'holds' if r['holds'] else 'violated'})")
        lines.append(f"- **{method}** ({len(tried)} settings tried): " + "; ".join(parts) + ".")
    return lines


def plot_lambdas(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[plots]'): no picture")
        return False
    fig, (ax_l, ax_c) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for r in rows:
        scalars = runlib.read_scalars(runlib.ROOT / r["log_dir"])
        label = f"{r['spec']['method']} {runlib.setting_label(r['spec'])}"
        line, = ax_l.plot(*scalars[runlib.LAMBDA], lw=1, label=label)
        ax_c.plot(*scalars[runlib.LENGTH], lw=0.8, color=line.get_color(), label=label)
    threshold = rows[0]["spec"]["threshold"]
    ax_l.set_yscale("symlog", linthresh=0.1)
    ax_l.set_ylabel("λ (length)")
    ax_l.legend(fontsize=8)
    ax_c.axhline(threshold, color="k", ls="--", lw=1)
    ax_c.set_ylabel("sampled mean length (train batch)")
    ax_c.set_xlabel("training step")
    fig.suptitle(f"length ≤ {threshold:g}: multiplier and sampled length per method ({rows[0]['spec']['max_steps']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None, help="the same step budget for every run (default: the frozen config's, 150)")
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out prompts sampled, capped by the held-out split (default: the frozen config's, 256)")
    parser.add_argument("--threshold", type=float, default=None, help="mean length at most this many tokens (default: the frozen config's, 10)")
    parser.add_argument("--dual-lrs", type=float, nargs="*", default=[0.05, 0.5], help="lagrangian η_λ values to try")
    parser.add_argument("--penalty-weights", type=float, nargs="*", default=[0.1, 1.0], help="penalty weights to try")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each when > 1)")
    parser.add_argument("--no-reuse", action="store_true", help="retrain runs whose row.json already matches")
    parser.add_argument("--out", type=Path, default=runlib.RESULTS)
    args = parser.parse_args()

    start = time.time()
    specs = specs_for(args)
    rows = runlib.run_specs(specs, runs=args.out / "runs", jobs=args.jobs, reuse=not args.no_reuse)
    wall = time.time() - start
    spec, config = specs[0], specs[0]["config"]

    header = [f"# Barrier vs lagrangian vs penalty: length ≤ {spec['threshold']:g} on the embedded default", "",
              f"{config}, {spec['max_steps']} training steps per run (shorter than "
              f"configs/length-concise.yaml's budget, to fit the CPU budget), seed 0, held-out prompts: {rows[0]['test_length']['n']}. "
              "λ is read from the EMA of Ĉ (`multipliers.ema: 0.8`) for every method. "
              f"Wall time {wall / 60:.1f} min ({args.jobs} runs at a time).", ""]
    md = header + table(rows) + ["", "## What the baselines took", ""] + what_it_took(rows) + [
        "", "Columns: *first step Ĉ ≤ 0* is the first training step (1-based) whose sampled batch met the constraint; "
        "*feasible batches* and the λ statistics are over the second half of training; *Δλ sign changes* counts "
        "reversals of λ's direction among the steps where it moved (out of the number of step pairs)."]
    print("\n" + "\n".join(md))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"config": config, "max_steps": spec["max_steps"], "eval_rows": spec["eval_rows"],
               "threshold": spec["threshold"], "wall_seconds": round(wall, 1), "runs": rows}
    (args.out / "compare_methods.json").write_text(json.dumps(summary, indent=2))
    (args.out / "compare_methods.md").write_text("\n".join(md) + "\n")
    written = [args.out / "compare_methods.json", args.out / "compare_methods.md"]
    if plot_lambdas(rows, args.out / "compare_methods_lambda.png"):
        written.append(args.out / "compare_methods_lambda.png")
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
