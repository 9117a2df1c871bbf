"""Threshold sweep: held-out perplexity against the achieved held-out mean length, and λ, μ per run.

    pip install -e ".[plots]"
    python experiments/sweep.py --max-steps 150               # after compare_methods: ~5 min (2 new runs)

Trains the frozen config configs/experiments/compare_methods.yaml (configs/length-concise.yaml with
the settings the comparison and this sweep were measured with, written out in full) for each length bound in ``--thresholds`` (mean length at most
b tokens, scale 10) and each method in ``--methods`` (``barrier``; ``lagrangian`` with ``--dual-lr``),
all with the same step budget, two runs at a time, then writes

* experiments/results/sweep_ppl_vs_length.png: held-out perplexity vs held-out mean length (95% CI
  as error bars), one labelled marker per run, each threshold as a dashed line of its colour;
* experiments/results/plots/<run>.png: λ, μ and the sampled mean length over training, per run;
* the same figures as TensorBoard images under experiments/results/runs/sweep
  (``tensorboard --logdir experiments/results/runs``, IMAGES tab);
* experiments/results/sweep.{json,md}: the table behind the picture.

Runs are shared with compare_methods.py through experiments/results/runs/<name>/row.json: a run with
the same spec (e.g. barrier at ≤ 10 with the same budget) is reused, not retrained. Unless
``--no-compare``, the other runs of compare_methods.json with the same budget (lagrangian, penalty
at ≤ 10) are drawn on the picture too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runlib  # noqa: E402
from runlib import fmt  # noqa: E402

MARKERS = {"barrier": "o", "lagrangian": "s", "penalty": "^"}


def compare_rows(out: Path, max_steps: int, eval_rows: int) -> list[dict]:
    path = out / "compare_methods.json"
    if not path.exists():
        return []
    summary = json.loads(path.read_text())
    return [r for r in summary["runs"] if r["spec"]["max_steps"] == max_steps and r["spec"]["eval_rows"] == eval_rows]


def scatter(rows: list[dict], thresholds: list[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    all_thresholds = sorted(set(thresholds) | {r["spec"]["threshold"] for r in rows})
    colour = {b: cmap(i / max(len(all_thresholds) - 1, 1) * 0.85) for i, b in enumerate(all_thresholds)}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for b in all_thresholds:
        ax.axvline(b, color=colour[b], ls="--", lw=1, alpha=0.7)
    for r in rows:
        spec, length = r["spec"], r["test_length"]
        err = [[length["mean"] - length["low"]], [length["high"] - length["mean"]]]
        ax.errorbar(length["mean"], r["test_ppl"], xerr=err, fmt=MARKERS[spec["method"]], color=colour[spec["threshold"]],
                    mfc=colour[spec["threshold"]] if r["holds"] else "white", ms=8, capsize=3, lw=1)
        option = "" if spec["method"] == "barrier" else " " + runlib.setting_label(spec)
        ax.annotate(f"{spec['method']}{option} ≤{spec['threshold']:g}", (length["mean"], r["test_ppl"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=7)
    for method, marker in MARKERS.items():
        if any(r["spec"]["method"] == method for r in rows):
            ax.plot([], [], marker, color="gray", label=method)
    ax.plot([], [], "o", color="gray", mfc="white", label="held-out mean above its bound")
    ax.plot([], [], "--", color="gray", label="length bound (colour = run's bound)")
    ax.set_xlabel("held-out mean response length, tokens (95% CI)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_yscale("log")
    steps = rows[0]["spec"]["max_steps"]
    ax.set_title(f"length ≤ b on the embedded default, {steps} steps per run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[6.0, 10.0, 16.0], help="length bounds (at most, tokens)")
    parser.add_argument("--methods", nargs="+", default=["barrier"], choices=["barrier", "lagrangian"])
    parser.add_argument("--dual-lr", type=float, default=0.05, help="η_λ for --methods lagrangian")
    parser.add_argument("--max-steps", type=int, default=None, help="the same step budget for every run (default: the frozen config's, 150)")
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out prompts sampled, capped by the held-out split (default: the frozen config's, 256)")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each when > 1)")
    parser.add_argument("--no-reuse", action="store_true", help="retrain runs whose row.json already matches")
    parser.add_argument("--no-compare", action="store_true", help="do not add compare_methods.json's runs to the picture")
    parser.add_argument("--out", type=Path, default=runlib.RESULTS)
    args = parser.parse_args()

    start = time.time()
    common = {"max_steps": args.max_steps, "eval_rows": args.eval_rows}
    specs = [runlib.make_spec(m, threshold=b, dual_lr=args.dual_lr if m == "lagrangian" else None, **common)
             for b in args.thresholds for m in args.methods]
    rows = runlib.run_specs(specs, runs=args.out / "runs", jobs=args.jobs, reuse=not args.no_reuse)
    wall = time.time() - start
    max_steps, eval_rows = specs[0]["max_steps"], specs[0]["eval_rows"]
    names = {r["name"] for r in rows}
    extra = [] if args.no_compare else [r for r in compare_rows(args.out, max_steps, eval_rows) if r["name"] not in names]
    every = rows + extra

    lines = [f"# Length-threshold sweep ({max_steps} steps per run, {specs[0]['config']}, seed 0)", "",
             "| run | bound | method | setting | held-out ppl | held-out mean length (95% CI) | holds | first step Ĉ ≤ 0 | fit s | from |",
             "| --- | ---: | --- | --- | ---: | --- | --- | ---: | ---: | --- |"]
    for r in sorted(every, key=lambda r: (r["spec"]["threshold"], r["spec"]["method"], r["name"])):
        s, length = r["spec"], r["test_length"]
        lines.append(f"| {r['name']} | ≤ {s['threshold']:g} | {s['method']} | {runlib.setting_label(s)} | {r['test_ppl']:.3f} "
                     f"| {length['mean']:.2f} ({length['low']:.2f} – {length['high']:.2f}) | {'yes' if r['holds'] else 'no'} "
                     f"| {r['first_feasible_step'] if r['first_feasible_step'] is not None else 'never'} | {r['fit_seconds']:.0f} "
                     f"| {'sweep' if r['name'] in names else 'compare_methods'} |")
    print("\n" + "\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps({"max_steps": max_steps, "thresholds": args.thresholds, "methods": args.methods,
                                                     "wall_seconds": round(wall, 1), "runs": every}, indent=2))
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("matplotlib is needed for the pictures: pip install -e '.[plots]' (the table was written)")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    tb_dir = args.out / "runs" / "sweep"
    shutil.rmtree(tb_dir, ignore_errors=True)
    writer = SummaryWriter(str(tb_dir))
    fig = scatter(every, args.thresholds)
    png = args.out / "sweep_ppl_vs_length.png"
    fig.savefig(png, dpi=120)
    writer.add_figure("sweep/ppl_vs_length", fig, global_step=max_steps)  # closes the figure
    written = [png]
    for r in every:
        path = args.out / "plots" / f"{r['name']}.png"
        writer.add_figure(f"runs/{r['name']}", runlib.plot_run(r, path), global_step=r["spec"]["max_steps"])
        written.append(path)
    writer.close()
    plt.close("all")
    print(f"wrote {args.out / 'sweep.json'}, {args.out / 'sweep.md'}, TensorBoard images in {tb_dir}")
    print("pictures: " + ", ".join(str(p) for p in written))
    print(f"wall time {wall / 60:.1f} min for the runs")


if __name__ == "__main__":
    main()
