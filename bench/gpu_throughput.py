"""Callback for bench/gpu_check.sh: tokens/s and model FLOPs utilisation of an L3M fit.

Per optimiser step it counts, summed over ranks:
* SFT tokens (prompt + reference response, forward + backward):            6·P per token
* sampled-sequence tokens for the policy-gradient pass (K · prompt + responses): 6·P per token
* generation: K · prompt tokens prefilled + response tokens decoded (forward only): 2·P per token
P is the parameter count (embeddings included); attention-score FLOPs are not counted, so MFU is a
slight underestimate for long sequences. The response length is the step's logged
``completions/mean_length`` (+1 for EOS is ignored). Steps before ``warmup_steps`` are excluded.
The sampling calls of the training steps are also timed on their own (synchronised before and after):
``tokens_per_s_sampling`` is the sampler's rate inside the fit loop, on each batch's new shapes, where
``tokens_per_s_sampled`` divides the same tokens by the whole step's time.
MFU = FLOPs/s / (world size · peak): peak from ``--peak_tflops`` (per device, dense bf16) or guessed
from the GPU name (H100/H200: 989, A100: 312).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


class ThroughputReport(L.Callback):
    def __init__(self, warmup_steps: int = 5, peak_tflops: float | None = None, out: str | None = None) -> None:
        self.warmup_steps, self.peak_tflops, self.out = warmup_steps, peak_tflops, out
        self.params = 0
        self.t_last = None
        self.totals = {"seconds": 0.0, "sampling_seconds": 0.0, "steps": 0, "sft_tokens": 0.0, "pg_tokens": 0.0,
                       "generated_tokens": 0.0, "prefill_tokens": 0.0}
        self.step_sampling_seconds = 0.0

    def setup(self, trainer, pl_module, stage) -> None:
        # before the strategy shards the model: the full parameter count
        self.params = sum(p.numel() for p in pl_module.model.parameters())
        sample = pl_module.sample

        def timed_sample(*args, **kwargs):  # the training steps' sampling calls (validation's are not counted)
            if not trainer.training:
                return sample(*args, **kwargs)
            start = self._now(pl_module.device)
            rollouts = sample(*args, **kwargs)
            self.step_sampling_seconds += self._now(pl_module.device) - start
            return rollouts

        pl_module.sample = timed_sample

    def _now(self, device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now(pl_module.device)
        k = pl_module.options.sampling.num_samples if pl_module.constraints else 0
        mean_len = float(trainer.callback_metrics.get("completions/mean_length", torch.tensor(0.0)))
        rows = batch["prompt_input_ids"].shape[0] * k
        prompt = float(batch["prompt_attention_mask"].sum())
        local = torch.tensor([float(batch["attention_mask"].sum()), k * prompt + rows * mean_len, rows * mean_len, k * prompt],
                             dtype=torch.float64, device=pl_module.device)
        counts = trainer.strategy.reduce(local, reduce_op="sum").tolist()
        if trainer.global_step > self.warmup_steps and self.t_last is not None:
            self.totals["seconds"] += now - self.t_last
            self.totals["steps"] += 1
            self.totals["sampling_seconds"] += self.step_sampling_seconds
            for key, value in zip(["sft_tokens", "pg_tokens", "generated_tokens", "prefill_tokens"], counts):
                self.totals[key] += value
        self.step_sampling_seconds = 0.0
        self.t_last = self._now(pl_module.device)

    def on_train_end(self, trainer, pl_module) -> None:
        t = self.totals
        if not trainer.is_global_zero or not t["steps"]:
            return
        flops = 6 * self.params * (t["sft_tokens"] + t["pg_tokens"]) + 2 * self.params * (t["generated_tokens"] + t["prefill_tokens"])
        peak = self.peak_tflops
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        if peak is None:
            peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        report = {
            "device": name,
            "world_size": trainer.world_size,
            "params_millions": self.params / 1e6,
            "timed_steps": t["steps"],
            "seconds_per_step": t["seconds"] / t["steps"],
            "tokens_per_s_trained": (t["sft_tokens"] + t["pg_tokens"]) / t["seconds"],
            "tokens_per_s_sampled": t["generated_tokens"] / t["seconds"],
            "sampling_seconds_per_step": t["sampling_seconds"] / t["steps"],
            "tokens_per_s_sampling": t["generated_tokens"] / t["sampling_seconds"] if t["sampling_seconds"] else None,
            "model_tflops_per_s_per_device": flops / t["seconds"] / trainer.world_size / 1e12,
            "peak_tflops_per_device": peak,
        }
        report["mfu"] = report["model_tflops_per_s_per_device"] / peak if peak else None
        print("\n== L3M throughput ==")
        for key, value in report.items():
            print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}")
        if self.out:
            Path(self.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.out).write_text(json.dumps({**report, "totals": t}, indent=2))
