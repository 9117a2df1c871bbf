"""Seconds per training step of a real ``python cli.py fit`` run, today's defaults against other settings.

    python bench/fit_speed.py --config configs/smollm2-sharegpt-length.yaml --steps 5 --untimed 1 \
        --variant "before issue 16=--model.sampling.decoder generate --model.optimizer.fused false --model.policy.share_prompts false"

Each variant (and ``today``: the config as it is) runs ``cli.py fit --config <config>`` for
``--untimed + --steps`` steps with lengths pinned to ``model.sampling.max_new_tokens`` (every
response the same length, so the variants do the same work), no validation, no checkpoints, no
export, its own TensorBoard folder, and ``l3m_lightning.callbacks.StepTimer`` timing each batch of
the real loop. ``--natural-lengths`` leaves the lengths to the model (responses end at a stop token,
as in training; the seed is the config's, so the variants sample alike until rounding sets them
apart) and the printed table adds each variant's mean sampled length. Variants alternate over
``--repeats`` rounds. Printed: the median s/step per variant and its speed-up over the first; the
JSON (``--out``, default ``bench/results/fit_speed.json``) holds every step time and mean sampled
length, the commands, the date and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def overlay(folder: Path, steps: int, max_new_tokens: int, pin_lengths: bool = True) -> Path:
    """The settings every variant shares on top of the config: timing only, nothing written into the repository."""
    settings = {
        "trainer": {"max_steps": steps, "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False, "log_every_n_steps": 1,
                    "default_root_dir": str(folder),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(folder)}},
                    "callbacks": [{"class_path": "l3m_lightning.callbacks.StepTimer", "init_args": {"output_path": str(folder / "times.json")}}]},
        "model": {"sampling": {"min_new_tokens": max_new_tokens if pin_lengths else 0}, "export_dir": ""},
    }
    path = folder / "overlay.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def max_new_tokens_of(config: Path) -> int:
    return int(yaml.safe_load(config.read_text())["model"]["sampling"]["max_new_tokens"])


def run(config: Path, flags: list[str], steps: int, pin_lengths: bool = True) -> tuple[list[float], list[float]]:
    """One fit; the per-batch step times StepTimer recorded and each step's mean sampled length (TensorBoard)."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        command = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(config.resolve()),
                   "--config", str(overlay(folder, steps, max_new_tokens_of(config), pin_lengths)), *flags]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=folder, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode:
            sys.exit(f"cli.py fit failed ({shlex.join(flags)}):\n{proc.stderr[-3000:]}")
        return json.loads((folder / "times.json").read_text())["step_s"], mean_lengths(folder)


def mean_lengths(folder: Path) -> list[float]:
    """``completions/mean_length`` of every step the run logged (none before the constraints switch on)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if "completions/mean_length" in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars("completions/mean_length")})
    return [values[step] for step in sorted(values)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--variant", action="append", default=[], help='"name=extra cli.py fit flags" (repeatable)')
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--untimed", type=int, default=1, help="first steps of each run left out of the median")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds")
    parser.add_argument("--natural-lengths", action="store_true", help="responses end at a stop token (lengths not pinned)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fit_speed.json")
    args = parser.parse_args(argv)
    variants = {"today": []}
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        variants[name] = shlex.split(flags)
    times: dict[str, list[float]] = {name: [] for name in variants}
    lengths: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, flags in variants.items():
            step_s, step_lengths = run(args.config, flags, args.untimed + args.steps, pin_lengths=not args.natural_lengths)
            times[name] += step_s[args.untimed :]
            lengths[name] += step_lengths[-args.steps :]  # the timed steps' (a warm-up logs none)
            print(f"done: {name}", file=sys.stderr)
    medians = {name: statistics.median(t) for name, t in times.items()}
    first = next(iter(medians.values()))
    mean_length = {name: statistics.fmean(v) if v else float("nan") for name, v in lengths.items()}
    lines = [f"{'variant':<24}{'s/step':>10}{'s/step / today':>18}{'mean sampled length':>22}",
             *(f"{n:<24}{m:>10.2f}{m / first:>18.2f}{mean_length[n]:>22.1f}" for n, m in medians.items())]
    print("\n".join(lines))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "command": shlex.join(["python", "bench/fit_speed.py", *(argv or sys.argv[1:])]),
              "config": str(args.config), "natural_lengths": args.natural_lengths, "variants": variants, "step_s": times,
              "median_step_s": medians, "mean_sampled_length": lengths, "table": "\n".join(lines)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
