"""Step time on batches whose shapes the process has not met before, as every step under ``fit`` meets them, by part.

``bench/step_time.py`` times its default steps first and its padded steps on the same batches afterwards,
so a cost paid once per new shape (an allocator growing, a kernel plan built, a compile) lands on the
default steps alone. This bench runs each step twice, on a fresh batch and then on the same batch again,
and reports per part (sampling, forward, backward, optimiser) the fresh and the repeat time: the
difference is what a new shape costs. ``--profile`` adds torch.profiler's top operators for one fresh step.
``--forward`` forces the pass (the module's ``default`` choice, ``shared``, ``packed``, ``padded``);
``--cudnn-attention`` lets SDPA use cuDNN's attention, as ``model.policy.cudnn_attention: true`` does.

On one H200 (2026-11-29, commit 6ea04c7, before the module kept cuDNN attention out; 122M Llama, bfloat16,
16 prompts x 4 samples x 64 tokens) sampling took 3.5-4.9 s on unseen shapes against 0.45-0.8 s on the same
batch again, and cuDNN's attention forward held 4.8 s of host time in the profiled step (docs/results.md).

    python bench/fresh_shapes.py --config 122m --device cuda --dtype bfloat16 --steps 3 --profile
    python bench/fresh_shapes.py --config 122m --device cuda --dtype bfloat16 --steps 3 --cudnn-attention
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# run as a script, bench/ is on the path: step_time sets the offline environment and puts the project on the path
from step_time import CONFIGS, ROOT, Timer, bench_module_and_batches, forced_forward

PARTS = ("sampling", "forward", "backward", "optimizer")


def run(args) -> dict:
    import torch

    device = torch.device(args.device)
    module, batches = bench_module_and_batches(args.config, args, args.warmup + args.steps + 1)
    policy = module.options.policy = forced_forward(module.options.policy, args.forward)
    optimizer = module.build_optimizer(total_steps=1000)["optimizer"]
    timer = Timer(device)
    taken = []

    def step(batch, tag: str) -> None:
        """training_step's parts, each timed on its own: sample, policy log-probs + objective, backward, optimiser."""
        with timer(f"sampling/{tag}"):
            rollouts = module.sample(batch, args.num_samples)
        with timer(f"forward/{tag}"):
            sft, pg = module.policy_logprobs(batch, rollouts)
            sft_loss = module.reduce_sft_loss(sft.sums(), sft.counts())[0]
            objective = module.objective.step(batch["prompts"], module.decode(rollouts), rollouts, pg)
        with timer(f"backward/{tag}"):
            (sft_loss + objective.loss).backward()
        with timer(f"optimizer/{tag}"):
            torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        shared = module.shared_prompt_layout(batch, (batch["input_ids"], batch["attention_mask"], batch["labels"]),
                                             (rollouts.input_ids, rollouts.attention_mask, rollouts.labels), rollouts)
        taken.append("shared" if shared is not None else "packed" if module._packing_ok and policy.fused_forward else "padded")

    for batch in batches[: args.warmup]:
        step(batch, "warmup")
    for batch in batches[args.warmup : args.warmup + args.steps]:
        step(batch, "fresh")
        step(batch, "repeat")
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            step(batches[-1], "profiled")
        averages = prof.key_averages()
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile = {"by_device_time": averages.table(sort_by=sort, row_limit=args.profile_rows),
                   "by_cpu_time": averages.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)}
    ms = {name: [1000 * t for t in times] for name, times in timer.times.items()}
    return {
        "config": args.config, "device": str(device), "dtype": args.dtype, "forward": args.forward, "cudnn_attention": args.cudnn_attention,
        "checks": {"sharing_ok": module._sharing_ok, "packing_ok": module._packing_ok, "head_ok": module._head_ok},
        "taken": taken,
        "median_ms": {part: {tag: statistics.median(ms[f"{part}/{tag}"]) for tag in ("fresh", "repeat")} for part in PARTS},
        "ms": ms,
        "profile": profile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="embedded", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--forward", default="default", choices=("default", "shared", "packed", "padded"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--decoder", default="lean", choices=["lean", "generate"], help="model.sampling.decoder")
    parser.add_argument("--cudnn-attention", action="store_true", help="model.policy.cudnn_attention: let SDPA use cuDNN's kernels")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fresh_shapes.json"))
    args = parser.parse_args()
    from l3m_lightning.attention import attention_kernels

    with attention_kernels(args.cudnn_attention):  # as the module's steps run (model.policy.cudnn_attention)
        result = run(args)
    print(f"{args.config} {args.device} {args.dtype} forward={args.forward} cudnn_attention={args.cudnn_attention} checks={result['checks']} taken={result['taken']}")
    print(f"{'part':<10}{'fresh ms':>10}{'repeat ms':>11}")
    for part, t in result["median_ms"].items():
        print(f"{part:<10}{t['fresh']:>10.1f}{t['repeat']:>11.1f}")
    if result["profile"]:
        print(result["profile"]["by_device_time"])
        print(result["profile"]["by_cpu_time"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
