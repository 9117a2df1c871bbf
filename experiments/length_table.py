"""Train sft, length-concise and length-verbose with the same budget; compare on held-out data.

    python experiments/length_table.py --parallel          # 600 steps each, ~27 min on 2 CPU cores

Each run is its frozen config, ``configs/experiments/length_table/<run>.yaml`` (the seed-0 table's
settings, written out in full); ``--seed``, ``--max-steps``, ``--eval-rows`` and ``--override
KEY=VALUE`` (constrained runs only) change it on top. Prints a table (held-out perplexity, mean
generated length on held-out prompts, constraint satisfied) and writes it to
experiments/results/length_table.json. Targets (issue #2): both constrained runs satisfy their
constraints on held-out prompts, their mean lengths differ by ≥ 2×, and each perplexity is within
10% of sft's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runlib import (ROOT, budget_settings, config_override, config_value, fit_and_test, frozen_config,  # noqa: E402
                    output_settings, override_settings, run_children)

RUNS = ("sft", "length-concise", "length-verbose")


def constraint(name: str) -> dict | None:
    """The run's length constraint (its frozen config's), or None for sft."""
    constraints = config_value(frozen_config(f"length_table/{name}"), "model.constraints")
    return constraints[0] if constraints else None


def run(name: str, max_steps: int | None, eval_rows: int | None, out: Path, seed: int = 0, overrides: Sequence[str] = ()) -> dict:
    """One run: its frozen config with the output folders under ``out``; steps, held-out rows, overrides if given."""
    settings = {"seed_everything": seed, **output_settings(out, name), **budget_settings(max_steps, eval_rows)}
    bound = constraint(name)
    if bound is not None:  # --override: for the constrained runs only
        settings.update(override_settings(overrides))
    # a fresh run each time: left-over checkpoints would make Lightning write last-v1.ckpt, … beside a stale last.ckpt
    result = fit_and_test(frozen_config(f"length_table/{name}"), settings, fresh=out / name / "checkpoints")
    length = result.metrics["test/completions/mean_length"]
    row = {"run": name, "fit_seconds": round(result.fit_seconds, 1), "test_ppl": result.metrics["test/ppl"], "mean_length": length}
    if bound is not None:
        sense, threshold = bound["sense"], float(bound["threshold"])
        row["constraint"] = f"length {'<=' if sense == 'at_most' else '>='} {threshold:g}"
        row["satisfied"] = bool(length <= threshold if sense == "at_most" else length >= threshold)
    return row


def run_in_parallel(args: argparse.Namespace) -> list[dict]:
    given = [part for flag in ("max_steps", "eval_rows") if getattr(args, flag) is not None
             for part in (f"--{flag.replace('_', '-')}", str(getattr(args, flag)))]
    commands = {name: [sys.executable, __file__, "--runs", name, *given, "--out", str(args.out), "--seed", str(args.seed),
                       *[part for item in args.override for part in ("--override", item)]] for name in args.runs}
    return run_children(commands, args.out, {**os.environ, "OMP_NUM_THREADS": "1"})


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None, help="training steps per run (default: the frozen configs', 600)")
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out prompts sampled for the length (default: the frozen configs', 256)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--parallel", action="store_true", help="one process per run, one thread each")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything (model init, sampling); results go to length_table_seed<N>.json if not 0")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", type=config_override,
                        help="a config override for the constrained runs, e.g. model.barrier.warmup_steps=100 (repeatable)")
    parser.add_argument("--row-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row_json:  # child of --parallel: one run, one JSON row
        args.row_json.write_text(json.dumps(run(args.runs[0], args.max_steps, args.eval_rows, args.out, args.seed, args.override)))
        return
    if args.parallel:
        rows = run_in_parallel(args)
    else:
        rows = [run(name, args.max_steps, args.eval_rows, args.out, args.seed, args.override) for name in args.runs]

    sft = next((r for r in rows if r["run"] == "sft"), None)
    print(f"\n{'run':<16} {'test ppl':>9} {'ppl/sft':>8} {'mean len':>9}  constraint       satisfied")
    for r in rows:
        ratio = r["test_ppl"] / sft["test_ppl"] if sft else float("nan")
        r["ppl_ratio_to_sft"] = ratio
        print(f"{r['run']:<16} {r['test_ppl']:>9.3f} {ratio:>8.3f} {r['mean_length']:>9.1f}  {r.get('constraint', '-'):<16} {r.get('satisfied', '-')}")
    lengths = {r["run"]: r["mean_length"] for r in rows}
    config = frozen_config(f"length_table/{args.runs[0]}")
    max_steps = config_value(config, "trainer.max_steps") if args.max_steps is None else args.max_steps
    eval_rows = config_value(config, "data.max_val_rows") if args.eval_rows is None else args.eval_rows
    summary = {"max_steps": max_steps, "eval_rows": eval_rows, "seed": args.seed, "overrides": args.override, "runs": rows}
    if "length-concise" in lengths and "length-verbose" in lengths:
        summary["verbose_to_concise_length_ratio"] = lengths["length-verbose"] / max(lengths["length-concise"], 1e-9)
        print(f"verbose/concise mean length: {summary['verbose_to_concise_length_ratio']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / ("length_table.json" if args.seed == 0 else f"length_table_seed{args.seed}.json")
    target.write_text(json.dumps(summary, indent=2))
    print(f"wrote {target}")


if __name__ == "__main__":
    main_cli()
