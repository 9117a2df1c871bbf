"""Test-only callback for the 2-process runs in test_distributed.py (imported by the CLI subprocess).

After every training batch it records, per rank, the μ the step used, the local constraint costs and
validity masks and the estimates/multipliers the module applied (``L3MModule.last_step``, an ``ObjectiveStep``),
how many parameter all-gathers sampling made, and rewrites ``<out_dir>/rank<r>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from l3m_lightning.sharding import fsdp2_modules, params_sharded


class LambdaDump(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.records: list[dict] = []
        self._mu = None

    def on_fit_start(self, trainer, pl_module) -> None:
        """Count FSDP2's parameter all-gathers (``dist.all_gather_single``) made while sampling."""
        import torch.distributed as dist

        sample = pl_module.sample

        def counted(batch, num_samples):
            real, calls = dist.all_gather_single, [0]

            def spy(*args, **kwargs):
                calls[0] += 1
                return real(*args, **kwargs)

            dist.all_gather_single = spy
            try:
                return sample(batch, num_samples)
            finally:
                dist.all_gather_single = real
                self._gathers = calls[0]

        pl_module.sample = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mu = pl_module.objective.mu  # μ decays in optimizer_step, i.e. before batch end
        self._active = pl_module.constraints_active()  # false during model.barrier.warmup_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active:
            return
        step = pl_module.last_step
        self.records.append({
            "step": trainer.global_step,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "mu": self._mu,
            "costs": step.costs.double().cpu().tolist(),
            "valid": step.valid.cpu().tolist(),
            "estimates": step.estimates.double().cpu().tolist(),
            "multipliers": step.multipliers.double().cpu().tolist(),
            "strategy": type(trainer.strategy).__name__,
            "sharded": params_sharded(pl_module.model, trainer),
            "generation_all_gathers": self._gathers,
            "fsdp_modules": len(fsdp2_modules(pl_module.model)),
            "sampled_rows": len(step.costs[0]),
            "scored_logits_only": pl_module.scoring_head((batch["input_ids"], batch["attention_mask"], batch["labels"])) is not None,
        })
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.records))


def token_mix(prompts, completions, completion_ids, **kwargs):
    """A reward that varies per sample and per prompt and drops some samples (``None``), so the
    rank-local means and sample counts differ from the all-reduced ones."""
    out = []
    for prompt, ids in zip(prompts, completion_ids):
        key = sum(map(ord, prompt)) + sum(ids)
        out.append(None if key % 4 == 0 else (key % 101) / 101)
    return out
