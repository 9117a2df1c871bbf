"""Train sft, length-concise and length-verbose with the same budget; compare on held-out data.

    python experiments/length_table.py --parallel          # 600 steps each, ~27 min on 2 CPU cores

Prints a table (held-out perplexity, mean generated length on held-out prompts, constraint
satisfied) and writes it to experiments/results/length_table.json. Targets (issue #2): both
constrained runs satisfy their constraints on held-out prompts, their mean lengths differ by
≥ 2×, and each perplexity is within 10% of sft's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from l3m_lightning.cli import main  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runlib import run_children  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"sft": None, "length-concise": ("at_most", 10.0), "length-verbose": ("at_least", 30.0)}


def config_override(item: str) -> str:
    """``--override`` values must be KEY=VALUE (e.g. model.mu_floor=0.1)."""
    if "=" not in item or not item.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"--override expects KEY=VALUE such as model.mu_floor=0.1, got {item!r}")
    return item


def run(name: str, max_steps: int, eval_rows: int, out: Path, seed: int = 0, overrides: Sequence[str] = ()) -> dict:
    args = [
        "fit",
        "--config", str(ROOT / "configs" / f"{name}.yaml"),
        "--seed_everything", str(seed),  # after --config, or the config's seed wins
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", str(max_steps),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.callbacks.init_args.dirpath", str(out / name / "checkpoints"),
        "--data.max_val_rows", str(eval_rows),
        "--model.export_dir", "",
    ]
    if RUNS[name] is not None:  # KEY=VALUE → --KEY VALUE, for the constrained runs only
        args += [part for key, value in (item.split("=", 1) for item in overrides) for part in (f"--{key}", value)]
    # a fresh run each time: left-over checkpoints would make Lightning write last-v1.ckpt, … beside a stale last.ckpt
    shutil.rmtree(out / name / "checkpoints", ignore_errors=True)
    start = time.time()
    cli = main(args)
    fit_seconds = time.time() - start
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    length = metrics["test/completions/mean_length"]
    row = {"run": name, "fit_seconds": round(fit_seconds, 1), "test_ppl": metrics["test/ppl"], "mean_length": length}
    if RUNS[name] is not None:
        sense, threshold = RUNS[name]
        row["constraint"] = f"length {'<=' if sense == 'at_most' else '>='} {threshold:g}"
        row["satisfied"] = bool(length <= threshold if sense == "at_most" else length >= threshold)
    return row


def run_in_parallel(args: argparse.Namespace) -> list[dict]:
    commands = {name: [sys.executable, __file__, "--runs", name, "--max-steps", str(args.max_steps),
                       "--eval-rows", str(args.eval_rows), "--out", str(args.out), "--seed", str(args.seed),
                       *[part for item in args.override for part in ("--override", item)]] for name in args.runs}
    return run_children(commands, args.out, {**os.environ, "OMP_NUM_THREADS": "1"})


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=600, help="the configs' budget")
    parser.add_argument("--eval-rows", type=int, default=256, help="held-out prompts sampled for the length")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--parallel", action="store_true", help="one process per run, one thread each")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything (model init, sampling); results go to length_table_seed<N>.json if not 0")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", type=config_override,
                        help="a config override for the constrained runs, e.g. model.constraint_warmup_steps=100 (repeatable)")
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
    summary = {"max_steps": args.max_steps, "eval_rows": args.eval_rows, "seed": args.seed, "overrides": args.override, "runs": rows}
    if "length-concise" in lengths and "length-verbose" in lengths:
        summary["verbose_to_concise_length_ratio"] = lengths["length-verbose"] / max(lengths["length-concise"], 1e-9)
        print(f"verbose/concise mean length: {summary['verbose_to_concise_length_ratio']:.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / ("length_table.json" if args.seed == 0 else f"length_table_seed{args.seed}.json")
    target.write_text(json.dumps(summary, indent=2))
    print(f"wrote {target}")


if __name__ == "__main__":
    main_cli()
