"""Where an L3M training step spends its time, against an SFT step, a bare KV-cached decode loop and ``cli.py fit``.

    OMP_NUM_THREADS=1 python bench/step_time.py                      # small defaults, ~3 min on 2 CPU cores
    python bench/step_time.py --configs 50m --batch-size 4 --num-samples 4 --max-new-tokens 32 --steps 5 --fit-steps 8

For each model config (``embedded``: the embedded default; ``50m``: a ~50M-parameter Llama via
``model_config`` overrides), on one real batch of the embedded data, it times (median over
``--steps`` after ``--warmup`` untimed steps):

* the parts of the real step, through the same calls ``L3MModule.training_step`` makes, one by one:
  sampling (``module.sample``: transformers ``generate``, KV cache), the forward pass over references
  and samples (``module.policy_logprobs``), the constrained objective (``module.decode`` +
  ``module.objective.step``: constraints, Ĉ, λ, surrogate), the backward pass of the summed loss,
  and the optimiser (AdamW step);
* each iteration on the next batch of the data (as fit's steps), so lengths vary as they do in fit;
* the real thing end to end: ``training_step`` + one backward + what Lightning does after it
  (clip the gradient norm at ``--gradient-clip-val``, the module's own optimiser — fused AdamW — and
  its schedule) ("L3M step"), timed as fit runs it: on successive batches with nothing in between;
  and an SFT step (SFT forward/backward + the same optimiser step);
* the same step under ``python cli.py fit`` (``--fit-steps``; TensorBoard logger, progress bar,
  the real loop), timed by ``l3m_lightning.callbacks.StepTimer``: ``fit/bench`` near 1 means the
  bench sees what fit spends. Two processes on this machine can differ by 10-20% for no reason in
  the code, so ``--rounds R`` alternates the bench's process and fit's R times: medians over the
  rounds, and each round's ratio;
* the step's sampling call with ``decoder: lean`` and with ``decoder: generate`` (transformers'
  ``generate``) on the same batch: ``lean/generate`` is the sampler's throughput ratio;
* a bare KV-cached sampling loop (prefill, then one token per step for every row, no stopping, no
  logits processors) on the same model, prompts and K: the practical limit for sampling here;
* the SFT + policy-gradient forward/backward alone, each prompt once (shared-prompt pass), one
  packed, padding-free pass, and two padded passes, on the sampled responses at full length ("full": every sample runs to
  ``max_new_tokens``, the worst case for packing) and cut by EOS at uniform random lengths
  ("varied": what a trained policy's samples look like).

Responses are pinned to ``max_new_tokens`` (``model.sampling.min_new_tokens``), so every sampler
and the bare loop produce the same tokens per step. Reported: per-phase ms, sampled tokens/s, sampling throughput as a fraction of the bare loop,
L3M step / SFT step, L3M step / (sampling + forward + objective + backward + optimiser) (1.0 = no
hidden overhead), the default step / one with padded passes, and shared or packed forward/backward / padded (on full and varied
lengths), peak memory (max RSS of the process on CPU — each config runs in its own subprocess —
or ``torch.cuda.max_memory_allocated`` on GPU). The table is printed and the JSON written to
``bench/results/step_time.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    "embedded": {},  # the embedded default: hidden 128, 4 layers
    "50m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 9, "num_key_value_heads": 9},
    # bench/gpu_check.sh's model (~122M parameters): its sampler phase times this one on the GPU
    "122m": {"hidden_size": 768, "intermediate_size": 3328, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12},
}


#: The forward/backward passes compared: each prompt once (shared), one packed pass, two padded passes.
FORWARDS = ("shared", "packed", "padded")

#: The parts of one L3M step, in order (``training_step`` with the module's default forward, then backward and optimiser).
PARTS = ("sampling", "forward", "objective", "backward", "optimizer")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    def __init__(self, device) -> None:
        self.device, self.times = device, {}

    def __call__(self, name):
        timer = self

        class _Ctx:
            def __enter__(self):
                _sync(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                _sync(timer.device)
                timer.times.setdefault(name, []).append(time.perf_counter() - self.t0)

        return _Ctx()


def bare_decode(model, prompt_ids, prompt_mask, num_samples: int, max_new_tokens: int, temperature: float = 1.0):
    """Prefill + ``max_new_tokens`` single-token steps with the KV cache for every row; returns [N, T] tokens."""
    import torch
    from transformers import DynamicCache

    ids = prompt_ids.repeat_interleave(num_samples, dim=0)
    mask = prompt_mask.repeat_interleave(num_samples, dim=0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = []
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache, use_cache=True).logits[:, -1]
        next_pos = position_ids[:, -1:] + 1
        for _ in range(max_new_tokens):
            token = torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1)
            out.append(token)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = model(input_ids=token, attention_mask=mask, position_ids=next_pos, past_key_values=cache, use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
    return torch.cat(out, dim=1)


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kb / 1024


def fit_step_time(name: str, args) -> dict:
    """The same step under ``python cli.py fit`` (TensorBoard logger, progress bar, the real loop), timed by ``StepTimer``.

    Same model, constraint, sampling, optimiser, clipping and batch size as the bench's step; the
    batches are the data module's own (prompt lengths vary a little from the bench's one batch).
    Returns the median ``step_s`` after ``--warmup`` untimed steps.
    """
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as folder:
        times = Path(folder) / "times.json"
        config = {
            "seed_everything": 0,
            "trainer": {"max_steps": args.warmup + args.fit_steps, "accelerator": "gpu" if args.device.startswith("cuda") else "cpu",
                        "devices": 1, "gradient_clip_val": args.gradient_clip_val or None, "limit_val_batches": 0,
                        "num_sanity_val_steps": 0, "enable_checkpointing": False, "default_root_dir": folder,
                        "precision": "bf16-true" if args.dtype == "bfloat16" else "32-true",
                        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": folder}},
                        "callbacks": [{"class_path": "l3m_lightning.callbacks.StepTimer", "init_args": {"output_path": str(times)}}]},
            "model": {"policy": {"config": dict(CONFIGS[name]) or None, "cudnn_attention": args.cudnn_attention}, "sft_loss_reduction": "sequence",
                      "constraints": [{"name": "length", "sense": "at_most", "threshold": 10, "scale": 10}],
                      "sampling": sampling_options(args), "optimizer": {"learning_rate": 1e-4}, "export_dir": ""},
            "data": {"batch_size": args.batch_size, "embedded_num_prompts": max(200, 4 * args.batch_size), "max_val_rows": 8},
        }
        path = Path(folder) / "fit.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(path)], capture_output=True, text=True, cwd=folder)
        if proc.returncode:
            sys.exit(f"cli.py fit ({name}) failed:\n{proc.stderr[-4000:]}")
        step_s = json.loads(times.read_text())["step_s"][args.warmup :]
    return {"fit_step_ms": 1000 * statistics.median(step_s), "fit_steps_timed": len(step_s)}


def sampling_options(args) -> dict:
    """K, lengths pinned to ``max_new_tokens`` (stop tokens held back, as every tool in the comparison does), the decoder."""
    return {"num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens,
            "decoder": args.decoder}


def forced_forward(policy, kind: str):
    """``policy`` (``PolicyArgs``) for a forward ``kind``: ``default`` (the module's choice: shared prompts when cheaper,
    else packed), or forced ``shared``, ``packed`` or ``padded``."""
    from dataclasses import replace

    return {"default": policy, "shared": replace(policy, share_prompts=True),
            "packed": replace(policy, share_prompts=False, fused_forward=True),
            "padded": replace(policy, share_prompts=False, fused_forward=False)}[kind]


def bench_module_and_batches(name: str, args, n_batches: int):
    """The bench's module (config ``name``, one length constraint, lengths pinned, ``args.dtype`` weights, training mode)
    on ``args.device``, and ``n_batches`` batches of the embedded data there: a new batch each step, as fit's steps get
    (prompt and reference lengths vary)."""
    import torch

    from l3m_lightning.data import ChatDataModule
    from l3m_lightning.module import L3MModule

    device = torch.device(args.device)
    torch.manual_seed(0)
    module = L3MModule(
        policy={"config": dict(CONFIGS[name]) or None, "torch_dtype": None, "cudnn_attention": args.cudnn_attention},
        constraints=[{"name": "length", "sense": "at_most", "threshold": 10, "scale": 10}],
        sampling=sampling_options(args),
        sft_loss_reduction="sequence",
        optimizer={"learning_rate": 1e-4},
    ).to(device)
    if args.dtype != "float32":
        module.model.to(getattr(torch, args.dtype))
    module.train()
    data = ChatDataModule(batch_size=args.batch_size, embedded_num_prompts=max(200, 4 * args.batch_size), max_val_rows=8)
    data.setup("fit")
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b, _ in zip(data.train_dataloader(), range(n_batches))]
    return module, batches


def run_one(name: str, args) -> dict:
    import torch

    from dataclasses import replace

    from l3m_lightning.module import dataset_columns
    from l3m_lightning.logprobs import share_prompts, shared_prompt_token_logprobs
    from l3m_lightning.sampling import pack_rollouts
    from l3m_lightning.decoding import FixedWindowDecode

    device = torch.device(args.device)
    module, batches = bench_module_and_batches(name, args, args.warmup + args.steps)
    n_params = sum(p.numel() for p in module.model.parameters())
    batch = batches[0]
    built = module.build_optimizer(total_steps=1000)  # what configure_optimizers gives fit: AdamW (fused) + warm-up-cosine
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    timer = Timer(device)

    def optimizer_step() -> None:
        """Lightning's automatic optimisation after backward: clip the norm, step, zero the gradients, step the schedule."""
        if args.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(module.model.parameters(), args.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

    def sft_step():
        with timer("sft_step"):
            loss, _ = module.sft_loss(batch)
            loss.backward()
            optimizer_step()

    defaults = module.options.policy

    def set_forward(kind: str) -> None:
        module.options.policy = forced_forward(defaults, kind)

    def phases():
        """The parts of ``training_step`` (the module's default forward), each timed through the module's and the objective's own calls."""
        set_forward("default")
        with timer("sampling"):
            rollouts = module.sample(batch, args.num_samples)
        with timer("forward"):
            sft, pg = module.policy_logprobs(batch, rollouts)
            sft_loss = module.reduce_sft_loss(sft.sums(), sft.counts())[0]
        with timer("objective"):
            step = module.objective.step(batch["prompts"], module.decode(rollouts), rollouts, pg, columns=dataset_columns(batch))
        with timer("backward"):
            (sft_loss + step.loss).backward()
        with timer("optimizer"):
            optimizer_step()
        for lengths, samples in (("full", rollouts), ("varied", cut_at_random_lengths(rollouts))):
            for kind in FORWARDS:
                forward_backward(samples, kind, f"fwd_bwd_{kind}_{lengths}")
        return sum(len(ids) + int(f) for ids, f in zip(rollouts.completion_ids, rollouts.finished))

    def forward_backward(rollouts, kind: str, name: str) -> None:
        """The step's forward (shared prompts, one packed pass, or two padded ones), its objective and backward, without sampling.

        ``shared`` is forced here (the module itself takes it only when it computes fewer positions).
        """
        set_forward(kind)
        completions = module.decode(rollouts)
        with timer(name):
            if kind == "shared":
                rows = (batch["input_ids"], batch["attention_mask"], batch["labels"])
                layout = share_prompts(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                       [(rows, torch.arange(len(rows[0]), device=device)),
                                        ((rollouts.input_ids, rollouts.attention_mask, rollouts.labels), rollouts.prompt_index)],
                                       module.tokenizer.pad_token_id)
                sft, pg = shared_prompt_token_logprobs(module.model, layout, head=module.scoring_head(rows)).split(len(rows[0]))
            else:
                sft, pg = module.policy_logprobs(batch, rollouts)
            sft_loss = module.reduce_sft_loss(sft.sums(), sft.counts())[0]
            step = module.objective.step(batch["prompts"], completions, rollouts, pg, columns=dataset_columns(batch))
            (sft_loss + step.loss).backward()
        optimizer.zero_grad(set_to_none=True)

    cut_rng = torch.Generator().manual_seed(0)

    def cut_at_random_lengths(rollouts):
        """The same samples ended by EOS at uniform random lengths 1..max_new_tokens, as a trained policy's vary."""
        new = torch.tensor([ids for ids in rollouts.completion_ids], device=device)
        ends = torch.randint(0, new.shape[1], (new.shape[0],), generator=cut_rng).to(device)
        new[torch.arange(new.shape[0], device=device), ends] = module.tokenizer.eos_token_id
        return pack_rollouts(batch["prompt_input_ids"], batch["prompt_attention_mask"], new, args.num_samples,
                             module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)

    def l3m_step(kind: str = "default"):
        set_forward(kind)
        with timer("l3m_step" if kind == "default" else f"l3m_step_{kind}"):
            loss = module.training_step(batch, 0)
            loss.backward()
            optimizer_step()

    def sampling_with(decoder: str, cuda_graphs: bool = False) -> None:
        """The step's sampling call with ``model.sampling.decoder`` set to ``decoder`` (and ``cuda_graphs``: the fixed-window step)."""
        chosen = module.options.sampling
        module.options.sampling = replace(chosen, decoder=decoder, cuda_graphs=cuda_graphs)
        with timer(f"sampling_{decoder}" + ("_cuda_graphs" if cuda_graphs else "")):
            module.sample(batch, args.num_samples)
        module.options.sampling = chosen

    def bare():
        with timer("bare_decode"):
            tokens = bare_decode(module.model, batch["prompt_input_ids"], batch["prompt_attention_mask"], args.num_samples, args.max_new_tokens)
        return tokens.numel()

    import warnings

    warnings.filterwarnings("ignore", message=".*self.log.*")
    # The whole step as fit runs it: first, on successive batches, one after another, nothing in between.
    # (Timed between the other measurements, right after other work on the same batch, it read up to
    # 20% fast at 2 threads: fit/bench 1.19-1.27.)
    for kind in ("default", "padded"):
        for i in range(args.warmup + args.steps):
            batch = batches[i]
            l3m_step(kind)
    whole_steps = {timed: timer.times.pop(timed)[args.warmup:] for timed in ("l3m_step", "l3m_step_padded")}
    set_forward("default")
    sampled, bare_tokens = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            timer.times.clear()
            sampled.clear(), bare_tokens.clear()
        batch = batches[i]
        sft_step()
        sampled.append(phases())
        set_forward("default")
        sampling_with("lean")
        sampling_with("lean", cuda_graphs=True)
        sampling_with("generate")
        bare_tokens.append(bare())
    timer.times.update(whole_steps)

    return with_ratios({
        "config": name,
        "model_config": dict(CONFIGS[name]),
        "params_millions": n_params / 1e6,
        "batch_size": args.batch_size,
        "num_samples": args.num_samples,
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens": statistics.median(int(b["prompt_input_ids"].shape[1]) for b in batches),
        "sft_tokens": statistics.median(int(b["input_ids"].shape[1]) for b in batches),
        "ms": {k: 1000 * statistics.median(v) for k, v in timer.times.items()},
        "sampled_tokens": statistics.median(sampled),
        "bare_tokens": statistics.median(bare_tokens),
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        # on a GPU: why the decode step's CUDA graph was refused (capture failed, or its replay disagreed), else None
        "cuda_graphs_refused": FixedWindowDecode.refused,
    })


def with_ratios(result: dict) -> dict:
    """``result`` with the throughputs and ratios its per-phase ``ms`` give."""
    ms = result["ms"]
    sampled_per_s, bare_per_s = 1000 * result["sampled_tokens"] / ms["sampling"], 1000 * result["bare_tokens"] / ms["bare_decode"]
    return {
        **result,
        "sampled_tokens_per_s": sampled_per_s,
        "bare_decode_tokens_per_s": bare_per_s,
        "sampling_fraction_of_bare": sampled_per_s / bare_per_s,
        "lean_over_generate_throughput": ms["sampling_generate"] / ms["sampling_lean"],
        "cuda_graphs_over_lean_throughput": ms["sampling_lean"] / ms["sampling_lean_cuda_graphs"],
        "l3m_over_sft_step": ms["l3m_step"] / ms["sft_step"],
        "l3m_over_parts": ms["l3m_step"] / sum(ms[k] for k in PARTS),
        "default_over_padded_step": ms["l3m_step"] / ms["l3m_step_padded"],
        "fwd_bwd_over_padded": {f"{kind}_{k}": ms[f"fwd_bwd_{kind}_{k}"] / ms[f"fwd_bwd_padded_{k}"] for kind in ("shared", "packed")
                                for k in ("full", "varied")},
    }


def merge_rounds(rounds: list[dict]) -> dict:
    """One config's rounds as one result: each phase's median over the rounds, each round's step times kept.

    A process on this 2-core machine can run 10-20% slower than the next one for its whole life
    (the 1.1M step over five rounds: 87-108 ms, docs/results.md), so a comparison between two
    processes (the bench's step against ``cli.py fit``'s) alternates them over rounds.
    """
    merged = dict(rounds[0], rounds=len(rounds))
    merged["ms"] = {k: statistics.median(r["ms"][k] for r in rounds) for k in rounds[0]["ms"]}
    merged["peak_memory_mb"] = max(r["peak_memory_mb"] for r in rounds)
    merged["bench_step_ms_by_round"] = [r["ms"]["l3m_step"] for r in rounds]
    if "fit_step_ms" in rounds[0]:
        merged["fit_step_ms_by_round"] = [r["fit_step_ms"] for r in rounds]
        merged["fit_over_bench_by_round"] = [r["fit_step_ms"] / r["ms"]["l3m_step"] for r in rounds]
        merged["fit_step_ms"] = statistics.median(merged["fit_step_ms_by_round"])
        merged["fit_over_bench"] = merged["fit_step_ms"] / merged["ms"]["l3m_step"]
    return with_ratios(merged)


def table(results: list[dict]) -> str:
    phases = [*PARTS, "sft_step", "l3m_step", "l3m_step_padded", "sampling_lean", "sampling_lean_cuda_graphs", "sampling_generate", "bare_decode",
              *(f"fwd_bwd_{kind}_{k}" for k in ("full", "varied") for kind in FORWARDS)]
    head = f"{'config':<10}{'params':>8}" + "".join(f"{p:>24}" for p in phases)
    lines = ["per-step time, ms (median)", head]
    for r in results:
        lines.append(f"{r['config']:<10}{r['params_millions']:>7.1f}M" + "".join(f"{r['ms'][p]:>24.1f}" for p in phases))
    ratios = ("shared_full", "packed_full", "shared_varied", "packed_varied")
    lines += ["", f"{'config':<10}{'sampled tok/s':>15}{'bare tok/s':>12}{'sampling/bare':>15}{'L3M/SFT step':>14}{'L3M/parts':>11}"
              f"{'step/padded':>13}" + "".join(f"{'fb ' + k + '/pad':>22}" for k in ratios) + f"{'peak MB':>10}"]
    for r in results:
        lines.append(f"{r['config']:<10}{r['sampled_tokens_per_s']:>15.0f}{r['bare_decode_tokens_per_s']:>12.0f}{r['sampling_fraction_of_bare']:>15.2f}"
                     f"{r['l3m_over_sft_step']:>14.2f}{r['l3m_over_parts']:>11.2f}{r['default_over_padded_step']:>13.2f}"
                     + "".join(f"{r['fwd_bwd_over_padded'][k]:>22.2f}" for k in ratios) + f"{r['peak_memory_mb']:>10.0f}")
    lines += ["", f"{'config':<10}{'lean/generate tok/s':>21}{'fit step ms':>13}{'bench step ms':>15}{'fit/bench':>11}  fit/bench by round"]
    for r in results:
        if "fit_step_ms" in r:
            by_round = " ".join(f"{ratio:.3f}" for ratio in r.get("fit_over_bench_by_round", []))
            fit = f"{r['fit_step_ms']:>13.1f}{r['ms']['l3m_step']:>15.1f}{r['fit_over_bench']:>11.3f}  {by_round}"
        else:
            fit = f"{'-':>13}{r['ms']['l3m_step']:>15.1f}{'-':>11}"
        lines.append(f"{r['config']:<10}{r['lean_over_generate_throughput']:>21.2f}{fit}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["embedded", "50m"], choices=sorted(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--decoder", default="lean", choices=["lean", "generate"], help="model.sampling.decoder of the step")
    parser.add_argument("--gradient-clip-val", type=float, default=1.0, help="as trainer.gradient_clip_val (0: none)")
    parser.add_argument("--fit-steps", type=int, default=5, help="timed steps of the same run under cli.py fit (0: skip)")
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds of the bench's process and cli.py fit's (medians)")
    parser.add_argument("--cudnn-attention", action="store_true", help="model.policy.cudnn_attention: let SDPA use cuDNN's kernels")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "step_time.json"))
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._one:  # child: one config, result as JSON on the last stdout line
        from l3m_lightning.attention import attention_kernels

        with attention_kernels(args.cudnn_attention):  # as the module's steps run (model.policy.cudnn_attention)
            print(json.dumps(run_one(args._one, args)))
        return

    results = []
    for name in args.configs:  # one subprocess per config, so peak RSS is that config's
        cmd = [sys.executable, __file__, "--_one", name, "--batch-size", str(args.batch_size), "--num-samples", str(args.num_samples),
               "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--dtype", args.dtype, "--decoder", args.decoder, "--gradient-clip-val", str(args.gradient_clip_val)] + ["--cudnn-attention"] * args.cudnn_attention
        rounds = []
        for i in range(args.rounds):  # the bench's process, then cli.py fit's, alternated
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
            rounds.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if args.fit_steps:
                rounds[-1].update(fit_step_time(name, args))
            print(f"done: {name}, round {i + 1} of {args.rounds}", file=sys.stderr)
        results.append(merge_rounds(rounds))

    import torch

    meta = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "fit_steps": args.fit_steps,
        "rounds": args.rounds,
        "decoder": args.decoder,
        "gradient_clip_val": args.gradient_clip_val,
        "cudnn_attention": args.cudnn_attention,
        "command": " ".join(["python bench/step_time.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
    }
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {out}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
