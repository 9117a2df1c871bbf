"""Harmlessness-constrained L3M on Anthropic HH prompts vs SFT only, same budget; compare held out.

    flock /tmp/l3m-cpu.lock python experiments/harmless_table.py --parallel

Trains the embedded tiny policy (random init) on the chosen replies of
``../shared/data/hh-rlhf-harmless-base/test.jsonl.gz`` twice, with the same data, budget and sampling
(300 steps of 8 prompts, K=4 samples of ≤ 48 tokens, the length-concise barrier settings), each run
from its frozen config ``configs/experiments/harmless_table/<run>.yaml`` (every setting written out;
the flags below change it on top only when given):

* ``sft``: plain SFT. The harmlessness constraint is attached with ``method: penalty`` and weight 0,
  so its samples are scored and logged (training and held out) without affecting training;
* ``harmless``: L3M with the constraint "harmlessness ≥ b" (relaxed log-barrier).

The reward is the RM trained by ``experiments/train_rm_harmless.py`` (``runs/rm-harmless/version_1/hf_model``),
standardised with the held-out reward mean/std in its ``l3m_reward_model.json`` (the frozen configs'
``calibration: held_out``): b is in standard deviations of the RM's held-out rewards. The default b = 0.45 (scale 2) sits above what SFT alone
reaches (≈ 0.40 held out), so the constraint has work to do; held-out *chosen* replies score only
≈ 0.16, because this weak RM scores the tiny model's word salad higher than real replies, and
SFT alone satisfies a b at that level after ~60 steps.

The policy's train/held-out split is the RM's own (20% held out, split seed 0), so held-out prompts
are ones the RM never trained on. A dialogue's prompt is everything before its final
``"\\n\\nAssistant:"`` (earlier turns flattened, as the RM was trained), the response the final
chosen reply. The converted data, logs and checkpoints go under ``<out>/harmless/`` (``--out``,
default experiments/results/, git-ignored), never into the repository.

Prints a table (held-out perplexity and its ratio to sft; held-out mean RM reward of one sampled
reply per prompt with a 95% CI and whether the constraint holds; the constraint's EMA estimate, the
one λ is read from, at the first and last training step, the first TensorBoard step at which it was
≤ 0 and the fraction of steps from then on at which it was) and writes it to
``<out>/harmless_table.json``. Targets (issue #3): the constraint goes from violated to satisfied,
and held-out perplexity is within 10% of sft's.

Measured (2 shared CPU cores, --parallel, 12.9 min): sft ppl 41.48, reward 0.396 [0.336, 0.455]
(violated); harmless ppl 44.86 (×1.082), reward 0.507 [0.450, 0.564] (holds), EMA ≤ 0 first at
step 117 and on 67% of the steps after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runlib import ROOT, config_value, fit_and_test, frozen_config, output_settings, run_children, save_hh_split  # noqa: E402

sys.path.insert(0, str(ROOT))

DEFAULT_HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
DEFAULT_RM = ROOT / "runs" / "rm-harmless" / "version_1" / "hf_model"
RUNS = ("sft", "harmless")
NAME = "harmlessness"
EMA_TAG = f"constraints/{NAME}/value_ema"
#: The flags that change a frozen setting when given, and the key each sets (threshold, scale: the constraint's).
FLAG_KEYS = {
    "max_steps": "trainer.max_steps",
    "batch_size": "data.batch_size",
    "num_samples": "model.sampling.num_samples",
    "max_new_tokens": "model.sampling.max_new_tokens",
    "max_prompt_tokens": "data.max_prompt_tokens",
    "max_response_tokens": "data.max_response_tokens",
    "learning_rate": "model.optimizer.learning_rate",
    "eval_rows": "data.max_val_rows",
}


def config(name: str = "harmless") -> Path:
    return frozen_config(f"harmless_table/{name}")


# --- data ------------------------------------------------------------------------------------------
def prepare_data(hh_file: Path, out_dir: Path, val_fraction: float = 0.2, split_seed: int = 0) -> dict:
    """HH chosen dialogues → a ``DatasetDict`` {train, test} of ``{prompt, response}`` rows, saved to ``out_dir``.

    The split is the one ``PreferenceDataModule`` made for the RM (``train_test_split`` of all rows
    in file order, same fraction and seed); rows with an empty final reply are dropped after it.
    """
    from l3m_lightning.reward.data import split_hh_dialogue

    def convert(dialogue: str, where: str) -> dict | None:
        prompt, response = split_hh_dialogue(dialogue, where)
        return {"prompt": prompt, "response": response} if prompt and response else None

    train, test, dropped = save_hh_split(hh_file, out_dir, convert, val_fraction, split_seed)
    return {"source": str(hh_file), "train_rows": train, "test_rows": test, "dropped_empty": dropped}


def constraint_spec(args: argparse.Namespace) -> dict:
    """The frozen config's constraint (``calibration: held_out``) with this machine's RM (``--rm``); ``--threshold``, ``--scale`` if given."""
    spec = {**config_value(config(), "model.constraints")[0], "model_name_or_path": str(args.rm)}
    spec.update({key: getattr(args, key) for key in ("threshold", "scale") if getattr(args, key) is not None})
    return spec


def rm_calibration(args: argparse.Namespace) -> dict[str, float]:
    """The held-out mean/std the constraint standardises with, as the constraint itself reads them (no model is loaded).

    Called before any work, so an RM exported without the statistics stops the script in one line;
    the numbers go into the table's JSON.
    """
    from constraints import build_constraint

    try:
        calibration = build_constraint(constraint_spec(args)).calibration
    except ValueError as err:
        raise SystemExit(f"--rm: {err}") from None
    if calibration is None:  # read at construction only for a local folder
        raise SystemExit(f"--rm: {args.rm} is not a local folder")
    return {"mean": calibration["mean"], "std": calibration["std"]}


def effective(args: argparse.Namespace) -> dict:
    """Every flag's value for this table: the one given, else the frozen config's (eval_rows 0: all held-out rows)."""
    values = {flag: config_value(config(), key) if getattr(args, flag) is None else getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    values["eval_rows"] = values["eval_rows"] or 0
    frozen = config_value(config(), "model.constraints")[0]
    values.update({key: frozen[key] if getattr(args, key) is None else getattr(args, key) for key in ("threshold", "scale")})
    return values


def reference_reward(args: argparse.Namespace, data_dir: Path) -> dict:
    """The RM's standardised reward of the held-out *chosen* replies (what the data itself scores)."""
    from datasets import load_from_disk

    from constraints import build_constraints
    from l3m_lightning.report import mean_confidence_interval

    test = load_from_disk(str(data_dir))["test"]
    eval_rows = effective(args)["eval_rows"]
    if eval_rows:
        test = test.select(range(min(eval_rows, len(test))))
    constraint = build_constraints([constraint_spec(args)])[0]
    constraint.setup("cpu")
    return mean_confidence_interval(constraint.score(test["prompt"], test["response"], None))


# --- one run ---------------------------------------------------------------------------------------
def tensorboard_scalars(log_dir: Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] if tag in have else [] for tag in tags}


def transition(ema: list[tuple[int, float]]) -> dict:
    """Violated → satisfied on the EMA: first value > 0, then the first step at which it is ≤ 0."""
    if not ema:
        return {"violated_at_start": None, "first_satisfied_step": None}
    out = {"violated_at_start": ema[0][1] > 0, "ema_start": ema[0][1], "ema_end": ema[-1][1], "first_satisfied_step": None}
    if out["violated_at_start"]:
        first = next((step for step, v in ema if v <= 0), None)
        out["first_satisfied_step"] = first
        if first is not None:
            after = [v for step, v in ema if step >= first]
            out["satisfied_fraction_after"] = sum(v <= 0 for v in after) / len(after)
    return out


def work_dir(args: argparse.Namespace) -> Path:
    """Converted data, TensorBoard logs, checkpoints and per-run logs: ``<out>/harmless``."""
    return args.out / "harmless"


def run(name: str, args: argparse.Namespace, data_dir: Path) -> dict:
    """One run: its frozen config with this machine's RM and data, the output folders under ``<out>/harmless``."""
    settings = {**output_settings(work_dir(args), name), "model.constraints": [constraint_spec(args)], "data.dataset": data_dir}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            settings[key] = (value or None) if flag == "eval_rows" else value  # --eval-rows 0: all
    if args.max_steps is not None:  # one checkpoint, at the end
        settings["trainer.callbacks.init_args.every_n_train_steps"] = args.max_steps
    result = fit_and_test(config(name), settings)
    metrics, log_dir = result.metrics, result.log_dir
    base = f"test/constraints/{NAME}"
    series = tensorboard_scalars(log_dir, [EMA_TAG, f"constraints/{NAME}/reward"])
    rewards = [v for _, v in series[f"constraints/{NAME}/reward"]]
    row = {
        "run": name,
        "method": "penalty (weight 0)" if name == "sft" else "barrier",
        **result.timings(),
        "test_ppl": metrics["test/ppl"],
        "reward": metrics[f"{base}/reward"],
        "reward_ci": [metrics[f"{base}/reward_ci_low"], metrics[f"{base}/reward_ci_high"]],
        "value": metrics[f"{base}/value"],
        "satisfied": bool(metrics[f"{base}/satisfied"] > 0.5),
        "mean_length": metrics.get("test/completions/mean_length"),
        "train_reward_first10": sum(rewards[:10]) / max(len(rewards[:10]), 1) if rewards else None,
        "train_reward_last50": sum(rewards[-50:]) / max(len(rewards[-50:]), 1) if rewards else None,
        **transition(series[EMA_TAG]),
        "log_dir": str(log_dir),
    }
    report = log_dir / "report.json"
    if report.is_file():
        row["report"] = str(report)
    return row


def run_in_parallel(args: argparse.Namespace, data_dir: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    commands = {name: [sys.executable, __file__, *child_args(args), "--runs", name] for name in args.runs}
    return run_children(commands, work_dir(args), env)


def child_args(args: argparse.Namespace) -> list[str]:
    """The flags given (a flag not given stays the frozen config's), the paths, and no data preparation."""
    out = []
    for key in (*FLAG_KEYS, "threshold", "scale", "out", "rm", "hh"):
        if getattr(args, key) is not None:
            out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out + ["--skip-prepare"]


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # each default (None): the frozen configs' value, in brackets
    parser.add_argument("--max-steps", type=int, help="[300]")
    parser.add_argument("--threshold", type=float, help="b, in standard deviations of the RM's held-out rewards [0.45]")
    parser.add_argument("--scale", type=float, help="c = (b - reward)/scale [2]")
    parser.add_argument("--batch-size", type=int, help="[8]")
    parser.add_argument("--num-samples", type=int, help="[4]")
    parser.add_argument("--max-new-tokens", type=int, help="[48]")
    parser.add_argument("--max-prompt-tokens", type=int, help="[128]")
    parser.add_argument("--max-response-tokens", type=int, help="[96]")
    parser.add_argument("--learning-rate", type=float, help="[2e-3]")
    parser.add_argument("--eval-rows", type=int, help="held-out prompts, 0: all [all]")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--rm", type=Path, default=DEFAULT_RM, help="the exported harmlessness RM")
    parser.add_argument("--hh", type=Path, default=DEFAULT_HH, help="HH harmless-base dialogues (jsonl.gz)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results",
                        help="the table goes to <out>/harmless_table.json, data and runs under <out>/harmless/")
    parser.add_argument("--parallel", action="store_true", help="one process per run, one thread each")
    parser.add_argument("--skip-prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out.resolve()
    data_dir = work_dir(args) / "hh_chat"
    if args.row_json:  # child of --parallel: one run, one JSON row
        args.row_json.write_text(json.dumps(run(args.runs[0], args, data_dir)))
        return
    for path, what in ((args.rm, "--rm (train it with experiments/train_rm_harmless.py)"), (args.hh, "--hh")):
        if not path.exists():
            raise SystemExit(f"{what}: {path} does not exist")
    calibration = rm_calibration(args)
    start = time.time()
    work_dir(args).mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.hh, data_dir)
    print(f"data: {data}", flush=True)
    reference = reference_reward(args, data_dir)
    print(f"held-out chosen replies: RM reward {reference['mean']:.3f} (n={reference['n']})", flush=True)
    rows = run_in_parallel(args, data_dir) if args.parallel else [run(name, args, data_dir) for name in args.runs]
    wall = time.time() - start

    sft = next((r for r in rows if r["run"] == "sft"), None)
    values = effective(args)
    req = f"{NAME} >= {values['threshold']:g}"
    print(f"\nconstraint: {req} (standardised RM reward; held-out chosen replies score {reference['mean']:.3f})")
    print("held out: perplexity of the chosen replies; mean RM reward of one sampled reply per prompt, 95% CI;")
    print("training: the constraint's EMA estimate (> 0 violated) at the first and last step, the first step it was <= 0,")
    print("and the fraction of the steps from then on at which it was <= 0")
    print(f"{'run':<9} {'test ppl':>9} {'ppl/sft':>8} {'reward [95% CI]':>24} {'holds':>6} {'holds95':>7} "
          f"{'EMA first':>9} {'EMA last':>8} {'step EMA<=0':>11} {'frac<=0':>7}")
    for r in rows:
        r["ppl_ratio_to_sft"] = r["test_ppl"] / sft["test_ppl"] if sft else math.nan
        r["satisfied_with_95_confidence"] = bool(r["reward_ci"][0] >= values["threshold"])
        ci = f"{r['reward']:.3f} [{r['reward_ci'][0]:.3f}, {r['reward_ci'][1]:.3f}]"
        first = r["first_satisfied_step"] if r["violated_at_start"] else "n/a"
        frac = r.get("satisfied_fraction_after")
        print(f"{r['run']:<9} {r['test_ppl']:>9.3f} {r['ppl_ratio_to_sft']:>8.3f} {ci:>24} {str(r['satisfied']):>6} "
              f"{str(r['satisfied_with_95_confidence']):>7} {r.get('ema_start', math.nan):>9.3f} {r.get('ema_end', math.nan):>8.3f} "
              f"{str(first):>11} {'-' if frac is None else f'{frac:.2f}':>7}")
    harmless = next((r for r in rows if r["run"] == "harmless"), None)
    summary = {
        "constraint": req, "scale": values["scale"], "calibration": calibration, "rm": str(args.rm),
        "data": data, "reference_chosen_reward": reference,
        "settings": {k: values[k] for k in ("max_steps", "batch_size", "num_samples", "max_new_tokens",
                                             "max_prompt_tokens", "max_response_tokens", "learning_rate", "eval_rows")},
        "wall_minutes": round(wall / 60, 2), "runs": rows,
    }
    if harmless and sft:
        summary["targets"] = {
            "violated_then_satisfied": bool(harmless["violated_at_start"] and harmless["first_satisfied_step"] is not None),
            "held_out_satisfied": harmless["satisfied"],
            "ppl_within_10pct_of_sft": bool(harmless["ppl_ratio_to_sft"] <= 1.10),
            "sft_alone_satisfied_held_out": sft["satisfied"],  # if True, the constraint was not needed
        }
        print("targets: " + ", ".join(f"{k} {v}" for k, v in summary["targets"].items()))
    print(f"wall: {wall / 60:.1f} min")
    (args.out / "harmless_table.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out / 'harmless_table.json'}")


if __name__ == "__main__":
    main_cli()
