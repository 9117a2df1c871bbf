"""L3M's real ``python cli.py fit`` against TRL's ``GRPOTrainer`` on the same model folder, prompts, K, lengths and batch.

    pip install -e ".[bench]"                                   # trl==1.16.0
    python bench/vs_trl.py                                      # rows embedded@32, embedded@64, 50m@32, 12 steps x 2 rounds
    python bench/vs_trl.py --steps 6 --untimed 2 --repeats 2    # the same rows, shorter: ~6 min on 2 quiet CPU cores
    python bench/vs_trl.py --configs embedded,50m --max-new-tokens 32,64 --steps 12 --repeats 2
    python bench/vs_trl.py --configs embedded --max-new-tokens 32 --steps 6 --repeats 1 --out /tmp/vs_trl.json

Rows: without ``--configs``/``--max-new-tokens`` the three default rows; with either, every
config × length (the other flag at its full default, ``embedded,50m`` / ``32,64``). Configs:
``embedded`` is the project's default 1.1M-parameter Llama; ``50m`` the same architecture with
``model.policy.config`` overrides (hidden 576, 12 layers, 9 heads: ~49M parameters).

For each row the bench writes, into a temporary folder that both tools read:

* the model as a plain Hugging Face folder (``L3MModule(policy={"config": ...})``, then
  ``save_pretrained`` of its model and tokenizer): L3M gets it as ``--model.policy.name_or_path``,
  TRL as ``GRPOTrainer(model=<folder>)``;
* a JSONL of chat rows from the embedded dataset (``{"messages": [user, assistant]}``), only prompts whose
  templated length is the most common one, so every step prefills the same number of tokens
  whatever order each tool shuffles the rows in. L3M reads the file as ``data.dataset`` (the
  assistant turn is the reference response of its SFT loss); TRL reads the same rows as a
  ``datasets.Dataset`` with a conversational ``prompt`` column (the user turn), so it applies the
  same chat template (checked: identical prompt token ids).

Then it runs, serialized and alternated (L3M, TRL, L3M short refs, L3M, TRL, ... for ``--repeats``
rounds), each run in its own subprocess with ``OMP_NUM_THREADS=2``/``MKL_NUM_THREADS=2`` (torch
uses 2 threads) and ``TOKENIZERS_PARALLELISM=false``:

* ``l3m``: ``python cli.py fit --config <run.yaml>`` with a length constraint
  ``{name: length, sense: at_most, threshold: 10, scale: 10}`` and the ``StepTimer`` callback
  (``l3m_lightning.callbacks``): the real fit loop, timed per batch from ``on_train_batch_start``
  to ``on_train_batch_end``. The YAML (kept in the JSON) is the whole config: trainer
  ``max_steps``, ``logger: false``, ``enable_checkpointing: false``, ``enable_progress_bar: false``,
  ``num_sanity_val_steps: 0``, ``limit_val_batches: 0``, ``default_root_dir`` the run's own folder
  (where the CLI saves its ``config.yaml``); ``model.export_dir: ""``.
* ``trl``: ``GRPOTrainer`` with a reward function computing the same thing, ``-(length - 10) / 10``
  (Python on the completion ids), timed per optimizer step by a ``TrainerCallback``
  (``on_step_begin`` to ``on_step_end``).
* ``l3m_short_refs``: L3M on the same prompts whose reference responses are one token (``"A"``, +
  the end-of-turn token): about as close to "L3M without its SFT pass" as the real CLI gets
  (there is no switch to drop it; the reference rows still hold their prompt tokens). Not a
  measurement of L3M without SFT.
* ``l3m_generate`` (only with ``--variants``): L3M with ``model.sampling.decoder: generate``
  (transformers' ``generate``, as TRL samples).

Every step of every run generates exactly ``batch × K × max_new_tokens`` tokens: EOS is masked out until
``max_new_tokens`` (L3M: ``model.sampling.min_new_tokens = max_new_tokens``; TRL:
``generation_kwargs={"min_new_tokens": N}``, which TRL passes into transformers' ``GenerationConfig``).
Both are checked per step (L3M's logged ``completions/mean_length``, the lengths TRL hands its reward
function) and reported as ``lengths_pinned``. With every length equal, every reward and
constraint value in a group is equal too: both tools' advantages are zero, the work is not.

Numbers (per tool and row; the first ``--untimed`` steps of every run are dropped, the rest of all
rounds pooled):

* ``s/step``: median wall time of one optimizer step of the real training loop (L3M: one batch;
  TRL: one step of its ``Trainer``); ``interval``: median time from one step's start to the next's
  (adds dataloading, logging and callbacks between steps);
* ``compl/s`` = batch × K / s/step; ``tok/s`` = batch × K × max_new_tokens / s/step (generated tokens);
* ``L3M/TRL``: throughput ratio, TRL's s/step / this tool's s/step (> 1: faster than TRL);
* floors, on the same model folder, 16 rows, in their own subprocess: ``bare decode`` is a plain
  KV-cached loop (prefill, then ``max_new_tokens`` single-token forwards for every row, multinomial
  sampling, no stopping, ``bench/step_time.py``'s ``bare_decode``); ``lean decode`` L3M's sampler
  alone (``decoding.lean_sample``, no stop tokens: the same tokens per row); ``bare fwd+bwd`` one padded
  forward + backward of the mean log-probability of the 16 sampled sequences (prompt + completion);
  ``optimizer`` one ``torch.optim.AdamW`` step. ``floor`` = the faster of the two decodes + fwd+bwd +
  AdamW: a reference for a step that samples and trains on those sequences once (no SFT pass, no
  constraint, no framework), not a strict lower bound (a tool can come in a little under it);
* ``per-run s/step``: each run's own median, in run order: a run slowed by other load on the machine stands out.

Parity settings (everything else is each tool's own default; the JSON lists them under
``parity`` and ``peer_defaults``): fp32 (TRL ``bf16=False``: its default is bf16), 2 threads, 4 prompts ×
K = 4 per step (TRL ``per_device_train_batch_size=16``, ``num_generations=4``,
``gradient_accumulation_steps=1``: one generation per optimizer step), temperature 1, no KL (TRL
``beta=0``, its default), no eval, no checkpoints (TRL ``save_strategy="no"``), no loggers (TRL
``report_to="none"``), gradient checkpointing off (TRL's default is on), progress bars off, lengths
pinned, the same AdamW learning rate (``--lr``, constant for neither: L3M warms up then decays by a
cosine, TRL decays linearly), gradient-norm clipping at 1.0 in both (TRL's default; L3M's configs'
setting, ``trainer.gradient_clip_val: 1.0``, where the Trainer's own default is none).

Output: the table on stdout, and JSON (``--out``, default ``bench/results/vs_trl.json``) with date,
git commit, versions, every setting, each run's per-step times and the L3M YAML.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Model configs: ``model.policy.config`` overrides of the embedded Llama (as in ``bench/step_time.py``).
CONFIGS: dict[str, dict[str, int]] = {
    "embedded": {},
    "50m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 9, "num_key_value_heads": 9},
}
DEFAULT_ROWS = (("embedded", 32), ("embedded", 64), ("50m", 32))
VARIANTS = ("l3m", "trl", "l3m_short_refs", "l3m_generate")
DEFAULT_VARIANTS = ("l3m", "trl", "l3m_short_refs")
LABELS = {"l3m": "L3M", "trl": "TRL GRPO", "l3m_short_refs": "L3M 1-tok refs", "l3m_generate": "L3M generate"}
#: The constraint L3M trains under; TRL's reward is its negated value.
LENGTH_CONSTRAINT = {"name": "length", "sense": "at_most", "threshold": 10, "scale": 10}
SHORT_REFERENCE = "A"  # one token of the embedded tokenizer (+ the end-of-turn token)


# --- inputs both tools read ---------------------------------------------------------------------------
def write_model_folder(config: str, folder: Path) -> float:
    """The config's model and tokenizer as a plain Hugging Face folder; returns millions of parameters."""
    from l3m_lightning.module import L3MModule

    module = L3MModule(policy={"config": CONFIGS[config] or None})
    module.model.save_pretrained(folder)
    module.tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in module.model.parameters()) / 1e6


def write_prompt_files(folder: Path, model_folder: Path, rows: int) -> tuple[Path, Path, int]:
    """Chat rows of the embedded set whose prompts all template to the same length: (full refs, 1-token refs, prompt tokens)."""
    from l3m_lightning.data import conversation_ids
    from l3m_lightning.embedded.dataset import generate_rows
    from l3m_lightning.policy import load_tokenizer

    tokenizer = load_tokenizer(str(model_folder))
    candidates = generate_rows(num_prompts=max(2000, 8 * rows), seed=0)
    lengths = [len(conversation_ids(tokenizer, r["messages"])[0]) for r in candidates]
    common = collections.Counter(lengths).most_common(1)[0][0]
    chosen = [r["messages"] for r, n in zip(candidates, lengths) if n == common][:rows]
    if len(chosen) < rows:
        raise SystemExit(f"only {len(chosen)} embedded prompts of {common} tokens; lower --rows")
    full, short = folder / "prompts.jsonl", folder / "prompts_short_refs.jsonl"
    full.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chosen))
    short.write_text("".join(json.dumps({"messages": [m[0], {"role": "assistant", "content": SHORT_REFERENCE}]}) + "\n" for m in chosen))
    return full, short, common


# --- one run per subprocess ------------------------------------------------------------------------------
def child_env(threads: int) -> dict[str, str]:
    """The environment of every run: N threads, no tokenizer threads, no hub."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def l3m_config(spec: dict[str, Any], variant: str, data_file: Path, run_dir: Path) -> dict[str, Any]:
    """The whole LightningCLI config of one L3M run (written as YAML; ``python cli.py fit --config`` reads it).

    ``run_dir`` is the Trainer's ``default_root_dir`` (where the CLI saves its ``config.yaml``) and holds the step times.
    """
    n = spec["max_new_tokens"]
    sampling = {"num_samples": spec["num_samples"], "max_new_tokens": n, "min_new_tokens": n, "temperature": 1.0}
    if variant == "l3m_generate":
        sampling["decoder"] = "generate"
    timer = {"class_path": "l3m_lightning.callbacks.StepTimer",
             "init_args": {"output_path": str(run_dir / "times.json"), "record": ["completions/mean_length"]}}
    return {
        "seed_everything": 0,
        "trainer": {"default_root_dir": str(run_dir), "accelerator": "cpu", "devices": 1, "precision": "32-true",
                    "max_steps": spec["steps"], "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "limit_val_batches": 0, "gradient_clip_val": 1.0, "callbacks": [timer]},
        "model": {"policy": {"name_or_path": spec["model"]}, "constraints": [LENGTH_CONSTRAINT], "sampling": sampling,
                  "optimizer": {"learning_rate": spec["lr"]}, "evaluation": {"generate": False, "log_samples_every_n_steps": 0},
                  "export_dir": ""},
        "data": {"dataset": str(data_file), "batch_size": spec["batch_size"]},
    }


def run_l3m(spec: dict[str, Any], variant: str, folder: Path, tag: str) -> dict[str, Any]:
    """``python cli.py fit --config <yaml>`` in a subprocess; the StepTimer's per-step times and lengths."""
    import yaml

    data = Path(spec["short_refs_data"] if variant == "l3m_short_refs" else spec["data"])
    run_dir = folder / tag
    run_dir.mkdir(parents=True, exist_ok=True)
    config = l3m_config(spec, variant, data, run_dir)
    config_path = run_dir / "run.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    load, started = os.getloadavg(), time.perf_counter()
    run_subprocess([sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(config_path)], spec["threads"], tag, spec["timeout"])
    timed = json.loads((run_dir / "times.json").read_text())
    return {"step_s": timed["step_s"], "interval_s": timed["interval_s"], "lengths": timed["metrics"]["completions/mean_length"],
            "run_wall_s": time.perf_counter() - started, "load_average_before": load, "config": config}


def run_child(kind: str, spec: dict[str, Any], folder: Path, tag: str) -> dict[str, Any]:
    """This file as a subprocess (``--_child trl`` or ``floors``); its result JSON."""
    spec_path, out = folder / f"{tag}.spec.json", folder / f"{tag}.result.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}))
    load, started = os.getloadavg(), time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", kind, "--_spec", str(spec_path)]
    run_subprocess(cmd, spec["threads"], tag, spec["timeout"])
    return {**json.loads(out.read_text()), "run_wall_s": time.perf_counter() - started, "load_average_before": load}


def run_subprocess(cmd: list[str], threads: int, tag: str, timeout: float) -> None:
    """Runs ``cmd`` from the repository root; on failure, exits with the tail of its output."""
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(threads), capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        sys.exit(f"{tag} failed ({' '.join(cmd)}):\n{(proc.stdout + proc.stderr)[-6000:]}")


# --- the TRL run and the floors (in the child) -----------------------------------------------------------
def trl_child(spec: dict[str, Any]) -> dict[str, Any]:
    """GRPOTrainer on the shared folder and prompts; per-step wall times from a TrainerCallback."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(spec["threads"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1]} for r in rows])
    lengths: list[int] = []
    stop_ids: set[int] = set()

    def length_reward(completions: list, completion_ids: list[list[int]], **_: Any) -> list[float]:
        """L3M's length constraint value, negated: (length - 10) / 10, the end-of-turn token not counted."""
        counted = [len(ids) - int(bool(ids) and ids[-1] in stop_ids) for ids in completion_ids]
        lengths.extend(counted)
        c = LENGTH_CONSTRAINT
        return [-(n - c["threshold"]) / c["scale"] for n in counted]

    class Timer(TrainerCallback):
        """Optimizer-step wall time: ``on_step_begin`` to ``on_step_end``, and start to start."""

        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.interval_s: list[float] = []
            self.start: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.start is not None:
                self.interval_s.append(now - self.start)
            self.start = now

        def on_step_end(self, args, state, control, **kwargs):
            self.step_s.append(time.perf_counter() - self.start)

    n, k = spec["max_new_tokens"], spec["num_samples"]
    config = trl_parity_config(spec, output_dir=str(Path(spec["out"]).parent / "trl_output"))
    timer = Timer()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=length_reward, args=GRPOConfig(**config), train_dataset=dataset,
                          callbacks=[timer])
    stop_ids.update(trainer.eos_token_ids if isinstance(trainer.eos_token_ids, list) else [trainer.eos_token_ids])
    trainer.train()
    per_step = [lengths[i : i + spec["batch_size"] * k] for i in range(0, len(lengths), spec["batch_size"] * k)]
    generation = {key: v for key, v in trainer.generation_config.to_diff_dict().items() if not key.startswith("transformers")}
    return {"step_s": timer.step_s, "interval_s": timer.interval_s, "lengths": [statistics.mean(s) for s in per_step],
            "all_lengths_equal_max": all(x == n for x in lengths), "completions_seen": len(lengths),
            "prompt_ids_match": trl_prompt_ids_match(trainer.processing_class, rows),
            "model_dtype": str(next(trainer.model.parameters()).dtype), "attn_implementation": trainer.model.config._attn_implementation,
            "generation_config": generation, "grpo_config": config, "torch_threads": torch.get_num_threads()}


def trl_parity_config(spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """The ``GRPOConfig`` fields set for parity; everything else is TRL's default."""
    n = spec["max_new_tokens"]
    return {
        "output_dir": output_dir, "max_steps": spec["steps"], "seed": 0,
        "per_device_train_batch_size": spec["batch_size"] * spec["num_samples"], "num_generations": spec["num_samples"],
        "gradient_accumulation_steps": 1, "max_completion_length": n, "generation_kwargs": {"min_new_tokens": n},
        "temperature": 1.0, "beta": 0.0, "learning_rate": spec["lr"], "bf16": False, "fp16": False,
        "gradient_checkpointing": False, "use_cpu": True, "report_to": "none", "save_strategy": "no", "eval_strategy": "no",
        "disable_tqdm": True,
    }


def trl_prompt_ids_match(tokenizer: Any, rows: list[dict[str, Any]]) -> bool:
    """TRL's templated prompt ids (as its ``_tokenize_prompts`` makes them) equal the ones L3M's data module makes."""
    from l3m_lightning.data import conversation_ids

    sample = rows[:8]
    ours = [conversation_ids(tokenizer, r["messages"])[0] for r in sample]
    theirs = tokenizer.apply_chat_template(conversation=[r["messages"][:-1] for r in sample], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    return [list(t) for t in theirs] == ours


def floors_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Bare decode, L3M's lean decode, bare forward+backward and one AdamW step on the shared folder: medians over ``steps - untimed`` repeats."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from l3m_lightning.decoding import lean_sample

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    bare_decode = load_step_time().bare_decode
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()][: spec["batch_size"]]
    ids = torch.tensor(tokenizer.apply_chat_template(conversation=[r["messages"][:-1] for r in rows], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"])  # equal lengths: no padding
    mask = torch.ones_like(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"])
    times: dict[str, list[float]] = {"bare_decode": [], "lean_decode": [], "fwd_bwd": [], "optimizer": []}
    for i in range(spec["steps"]):
        model.eval()
        t0 = time.perf_counter()
        lean_sample(model, ids, mask, spec["num_samples"], spec["max_new_tokens"], [], tokenizer.pad_token_id)
        t1 = time.perf_counter()
        completions = bare_decode(model, ids, mask, spec["num_samples"], spec["max_new_tokens"])
        t2 = time.perf_counter()
        model.train()
        sequences = torch.cat([ids.repeat_interleave(spec["num_samples"], dim=0), completions], dim=1)
        logits = model(input_ids=sequences).logits[:, ids.shape[1] - 1 : -1]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, completions.unsqueeze(-1))
        (-logp.mean()).backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if i >= spec["untimed"]:
            for name, dt in zip(times, (t2 - t1, t1 - t0, t3 - t2, t4 - t3)):  # in the order of ``times``
                times[name].append(dt)
    return {"s": {name: statistics.median(v) for name, v in times.items()}, "times": times, "torch_threads": torch.get_num_threads()}


def load_step_time() -> Any:
    """``bench/step_time.py`` as a module (its ``bare_decode``): bench/ is not a package."""
    spec = importlib.util.spec_from_file_location("step_time", ROOT / "bench" / "step_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- one row: alternate the runs, summarise ----------------------------------------------------------------
def bench_row(config: str, max_new_tokens: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every variant of one config × length, alternated for ``--repeats`` rounds, then the floors."""
    folder = workdir / f"{config}_{max_new_tokens}"
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "model"
    params = write_model_folder(config, model)
    data, short_data, prompt_tokens = write_prompt_files(folder, model, args.rows)
    spec = {"model": str(model), "data": str(data), "short_refs_data": str(short_data), "max_new_tokens": max_new_tokens,
            "num_samples": args.num_samples, "batch_size": args.batch_size, "steps": args.steps, "untimed": args.untimed,
            "lr": args.lr, "threads": args.threads, "timeout": args.timeout}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for round_ in range(args.repeats):
        for variant in args.variants:
            tag = f"{variant}_r{round_}"
            log(f"{config}@{max_new_tokens}: {tag}")
            run = run_child("trl", spec, folder, tag) if variant == "trl" else run_l3m(spec, variant, folder, tag)
            runs[variant].append(run)
    floors = run_child("floors", spec, folder, "floors") if args.floors else None
    tools = {v: summarise(runs[v], args, max_new_tokens) for v in args.variants}
    if "trl" in tools:
        for v, s in tools.items():
            s["throughput_vs_trl"] = tools["trl"]["median_step_s"] / s["median_step_s"]
            # each round's ratio (its TRL run's median over this run's): how much of a run's verdict is which processes came out slow
            s["throughput_vs_trl_by_round"] = [t / m for t, m in zip(tools["trl"]["per_run_median_step_s"], s["per_run_median_step_s"])]
    row = {"config": config, "model_config": CONFIGS[config], "params_millions": params, "max_new_tokens": max_new_tokens,
           "prompt_tokens": prompt_tokens, "completions_per_step": args.batch_size * args.num_samples,
           "generated_tokens_per_step": args.batch_size * args.num_samples * max_new_tokens, "tools": tools, "floors": floors}
    if floors:
        f = floors["s"]
        row["floors"]["bare_step_s"] = min(f["bare_decode"], f["lean_decode"]) + f["fwd_bwd"] + f["optimizer"]
    return row


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace, max_new_tokens: int) -> dict[str, Any]:
    """Median s/step over every run's timed steps, throughputs, and whether every step generated max_new_tokens per row."""
    timed = [t for r in runs for t in r["step_s"][args.untimed :]]
    intervals = [t for r in runs for t in r["interval_s"][args.untimed :]]
    median = statistics.median(timed)
    completions = args.batch_size * args.num_samples
    lengths = [x for r in runs for x in r["lengths"]]
    out = {"median_step_s": median, "median_interval_s": statistics.median(intervals) if intervals else None,
           "completions_per_s": completions / median, "generated_tokens_per_s": completions * max_new_tokens / median,
           "per_run_median_step_s": [statistics.median(r["step_s"][args.untimed :]) for r in runs],
           "timed_steps": len(timed), "lengths_pinned": bool(lengths) and all(x == max_new_tokens for x in lengths), "runs": runs}
    if "all_lengths_equal_max" in runs[0]:
        out["lengths_pinned"] = out["lengths_pinned"] and all(r["all_lengths_equal_max"] for r in runs)
    return out


# --- report ------------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """One line per tool and row: s/step, interval, completions/s, tokens/s, throughput vs TRL, lengths pinned."""
    head = (f"{'config':<10}{'params':>8}{'N':>5}  {'run':<16}{'s/step':>8}{'interval':>10}{'compl/s':>9}{'tok/s':>8}{'L3M/TRL':>9}"
            f"  pinned  per-run s/step (L3M/TRL by round)")
    lines = [f"median over timed steps ({args.steps} steps per run, first {args.untimed} untimed, {args.repeats} alternated round(s)); "
             f"{args.batch_size} prompts x K={args.num_samples} per step, every completion exactly N tokens", head, "-" * len(head)]
    for r in rows:
        first = f"{r['config']:<10}{r['params_millions']:>7.1f}M{r['max_new_tokens']:>5}  "
        pad = " " * len(first)
        for i, (variant, s) in enumerate(r["tools"].items()):
            ratio = f"{s['throughput_vs_trl']:.2f}x" if "throughput_vs_trl" in s else "-"
            interval = f"{s['median_interval_s']:.3f}" if s["median_interval_s"] is not None else "-"
            pinned = "yes" if s["lengths_pinned"] else "NO"
            lines.append(f"{first if i == 0 else pad}{LABELS[variant]:<16}{s['median_step_s']:>8.3f}{interval:>10}"
                         f"{s['completions_per_s']:>9.1f}{s['generated_tokens_per_s']:>8.0f}{ratio:>9}  {pinned:<6}  "
                         + " ".join(f"{m:.3f}" for m in s["per_run_median_step_s"])
                         + (f"  ({' '.join(f'{x:.2f}' for x in s['throughput_vs_trl_by_round'])})" if variant != "trl" and "trl" in r["tools"] else ""))
        if r["floors"]:
            f, n = r["floors"]["s"], r["generated_tokens_per_step"]
            lines.append(f"{pad}{'bare decode':<16}{f['bare_decode']:>8.3f}{'':>10}{'':>9}{n / f['bare_decode']:>8.0f}")
            lines.append(f"{pad}{'lean decode':<16}{f['lean_decode']:>8.3f}{'':>10}{'':>9}{n / f['lean_decode']:>8.0f}")
            lines.append(f"{pad}{'bare fwd+bwd':<16}{f['fwd_bwd']:>8.3f}")
            lines.append(f"{pad}{'AdamW step':<16}{f['optimizer']:>8.3f}")
            floor = r["floors"]["bare_step_s"]
            lines.append(f"{pad}{'floor':<16}{floor:>8.3f}{'':>10}{r['completions_per_step'] / floor:>9.1f}{n / floor:>8.0f}")
    return "\n".join(lines)


def parity_settings(args: argparse.Namespace) -> dict[str, str]:
    """What was set so that both tools do the same work; everything else is each tool's default."""
    return {
        "dtype": "fp32 (TRL bf16=False, fp16=False: TRL's default is bf16; L3M precision 32-true, its default)",
        "threads": f"OMP_NUM_THREADS={args.threads}, MKL_NUM_THREADS={args.threads}, torch threads {args.threads}, TOKENIZERS_PARALLELISM=false",
        "batch": f"{args.batch_size} prompts x K={args.num_samples}: L3M data.batch_size={args.batch_size}, model.sampling.num_samples={args.num_samples}; "
                 f"TRL per_device_train_batch_size={args.batch_size * args.num_samples}, num_generations={args.num_samples}, "
                 "gradient_accumulation_steps=1 (one generation per optimizer step)",
        "lengths": "every completion exactly max_new_tokens: L3M model.sampling.min_new_tokens = max_new_tokens; "
                   "TRL max_completion_length = N, generation_kwargs={'min_new_tokens': N}",
        "temperature": "1.0 in both (both defaults); top_k 0, top_p 1.0 (both defaults)",
        "kl": "none: TRL beta=0.0 (its default: no reference model); L3M has no KL term",
        "eval_checkpoints_logging": "L3M num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=false, logger=false, "
                                    "enable_progress_bar=false, export_dir=''; TRL eval_strategy='no', save_strategy='no', report_to='none', disable_tqdm=True",
        "gradient_checkpointing": "off: TRL gradient_checkpointing=False (its default is on); L3M's default is off",
        "optimizer": f"AdamW at learning rate {args.lr} in both (schedules, betas and weight decay each tool's default)",
        "gradient_clipping": "global norm 1.0 in both: TRL's default max_grad_norm; L3M trainer.gradient_clip_val=1.0 (the shipped configs' "
                             "setting; Lightning's Trainer default is no clipping)",
        "model_and_prompts": "one save_pretrained folder and one JSONL per row, read by both; prompts of one templated length",
        "reward": "L3M: length constraint {name: length, sense: at_most, threshold: 10, scale: 10}; TRL: a Python reward "
                  "-(length - 10) / 10 on the completion ids",
    }


def peer_defaults() -> dict[str, str]:
    """TRL defaults that shape its step, kept as they are."""
    return {"loss_type": "dapo", "num_iterations": "1 (no second pass for old log-probs)", "scale_rewards": "group",
            "lr_scheduler_type": "linear, no warm-up", "optim": "adamw_torch (betas 0.9, 0.999, weight decay 0)",
            "generation": "transformers generate, KV cache, each prompt repeated K times", "logging_steps": "10",
            "max_grad_norm": "1.0"}


def meta(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """Date, commit, versions, machine."""
    import importlib.metadata as md

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()  # porcelain lines start with a space

    from l3m_lightning.options import SamplingArgs

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git_commit": git("rev-parse", "HEAD").strip(),
            "git_uncommitted": git("status", "--porcelain").splitlines(), "child_torch_threads": child_torch_threads(args.threads),
            "versions": {name: version(name) for name in ("torch", "transformers", "trl", "lightning", "accelerate", "datasets")},
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "wall_s": time.perf_counter() - started,
            "l3m_decoder_default": getattr(SamplingArgs(), "decoder", None), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def child_torch_threads(threads: int) -> int:
    """``torch.get_num_threads()`` in a process with the runs' environment (the L3M runs set no threads themselves)."""
    cmd = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    return int(subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True, check=True).stdout)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- command line ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", help="comma-separated, of: " + ", ".join(CONFIGS))
    parser.add_argument("--max-new-tokens", help="comma-separated lengths, e.g. 32,64")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run, untimed ones included")
    parser.add_argument("--untimed", type=int, default=2, help="first steps of every run left out of the medians")
    parser.add_argument("--repeats", type=int, default=2, help="alternated rounds of every variant")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    parser.add_argument("--num-samples", type=int, default=4, help="K completions per prompt")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=256, help="prompts in the JSONL")
    parser.add_argument("--no-floors", dest="floors", action="store_false", help="skip the bare decode / fwd+bwd floors")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--workdir", help="keep the model folders, prompts, YAMLs and logs here (default: a temp dir, removed)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_trl.json"))
    parser.add_argument("--_child", choices=["trl", "floors"], help=argparse.SUPPRESS)
    parser.add_argument("--_spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        return args
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS)) + sorted(set((args.configs or "").split(",")) - set(CONFIGS) - {""})
    if unknown:
        parser.error(f"unknown variant or config: {', '.join(unknown)}")
    if args.configs is None and args.max_new_tokens is None:
        args.row_list = list(DEFAULT_ROWS)
    else:
        configs = (args.configs or ",".join(CONFIGS)).split(",")
        lengths = [int(n) for n in (args.max_new_tokens or "32,64").split(",")]
        args.row_list = [(c, n) for c in configs for n in lengths]
    if not 0 <= args.untimed < args.steps:
        parser.error("--untimed must be in [0, --steps)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args._child:  # one run, in its own process
        spec = json.loads(Path(args._spec).read_text())
        result = trl_child(spec) if args._child == "trl" else floors_child(spec)
        Path(spec["out"]).write_text(json.dumps(result))
        return result
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_trl_") as tmp:
        workdir = Path(args.workdir or tmp)
        rows = [bench_row(config, n, args, workdir) for config, n in args.row_list]
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("out", "workdir")}
    result = {"meta": meta(args, started), "settings": settings, "parity": parity_settings(args), "peer_defaults": peer_defaults(),
              "rows": rows}
    text = table(rows, args)
    print(text)
    print("\nparity settings (everything else each tool's default):")
    for key, value in result["parity"].items():
        print(f"  {key}: {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "table": text}, indent=1))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
