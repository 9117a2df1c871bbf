"""L3MModule: SFT loss plus the relaxed log-barrier on sampled-response constraints.

The training step (method.md §5), top to bottom in ``training_step``:

1. Sample K responses per prompt (no grad, KV cache, stop at EOS); score every constraint.
2. Forward passes over the reference and the sampled sequences (one packed pass, or two padded):
   SFT NLL of the references (prompt tokens masked) and log π of every sampled token.
3. Ĉ_i = mean of c_ij (all-reduced across ranks); λ_i = B'_μ(Ĉ_i)/k (or a baseline's λ).
4. loss = L_sft + Σ_i sg(λ_i) · mean_j[sg(c_ij − β_ij) · log π(y_j|x_j)], β = leave-one-out
   (``constraint_surrogate``; with ``value_baseline`` each token's β also gets V(x, y_<t) − V(x)).
5. One optimiser step (Lightning); μ decays on schedule after it.

With no constraints it is plain SFT.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import CatMetric
from torchmetrics.text import Perplexity

from constraints import Constraint, build_constraints
from l3m_lightning.barrier import MuSchedule
from l3m_lightning.callbacks import JsonlPredictionWriter
from l3m_lightning.checkpointing import ExactResume
from l3m_lightning.data import IGNORE_INDEX
from l3m_lightning.diagnostics import FeasibilityMonitor, NoValidSamplesMonitor, TruncationMonitor, option_warnings, warn_all
from l3m_lightning.estimator import ExponentialMovingAverage, masked_mean, policy_gradient_surrogate, token_level_surrogate
from l3m_lightning.multipliers import MultiplierRule
from l3m_lightning.outputs import check_fit_outputs, export_marker, resolve_export_dir, save_pretrained_atomically
from l3m_lightning.packing import TokenLogprobs, pack, packed_token_logprobs, packing_matches_padding, padded_token_logprobs
from l3m_lightning.policy import EMBEDDED, apply_lora, load_policy, load_tokenizer, stop_token_ids
from l3m_lightning.report import constraint_row, mean_confidence_interval, write_report
from l3m_lightning.sampling import Rollouts, sample_rollouts
from l3m_lightning.schedules import warmup_cosine
from l3m_lightning.sharded_generation import unsharded_for_generation
from l3m_lightning.value_baseline import TokenValueHead


class L3MModule(L.LightningModule):
    """Constrained fine-tuning of a causal LM with the L3M relaxed log-barrier.

    Args:
        model_name_or_path: ``"embedded"`` (the small offline default), any Hugging Face causal LM (hub
            name or folder), or a ``.gguf`` file / ``pkg:<module>/<file>.gguf`` (dequantised once, cached;
            constraints/model_source.py).
        tokenizer_name_or_path: defaults to ``model_name_or_path``.
        model_config: config overrides (for ``embedded``: its size, e.g. ``{hidden_size: 256}``).
        constraints: entries ``{name: length, threshold: 20, sense: at_most, scale: 10}`` or
            ``{class_path: ..., init_args: {...}}``; empty means plain SFT.
        num_samples: K responses sampled per prompt (K ≥ 2 enables the leave-one-out baseline).
        max_new_tokens / temperature / top_k / top_p: sampling; temperature 1 and no truncation
            keep the policy gradient unbiased.
        generation_batch_size: at most this many sequences are decoded at once (None: all B·K), to
            bound the KV cache. Under FSDP2 the parameters are gathered once for the whole batch
            (sharded_generation.py); under FSDP1 every decode step all-gathers, ranks in lockstep.
        mu_start / mu_floor / mu_decay / mu_decay_every: μ ← max(floor, decay·μ) every N steps.
        constraint_ema: EMA of Ĉ_i before reading λ_i off (0 = off; our option, not the paper's).
        constraint_warmup_steps: optimiser steps of plain SFT (no sampling) before the constraints
            switch on; the μ schedule starts counting then. 0 (default) is the paper's one stage. For a
            policy trained from random init, so the barrier does not shape answers the model cannot
            write yet (README, "Constraint warm-up"). Our option.
        value_baseline: add a learned per-token baseline V_i(x, y_<t) − V_i(x) to the leave-one-out one
            (value_baseline.py): still unbiased, and the content tokens of a long response stop
            carrying the advantage its first tokens earned. Our option (method.md leaves the baseline open).
        value_head_lr: the value head's AdamW learning rate, apart from the policy's: a linear read-out
            must keep up with the policy's changing features even when the policy's rate is tiny (1e-6).
        value_head_width: 0 = a linear head; otherwise one hidden layer (GELU) of this width.
        gae_lambda: with ``value_baseline``, 1 = Monte-Carlo advantages (unbiased); < 1 = GAE(λ): each
            token is credited mostly with the change of V it caused — less variance, biased by V's error.
        method: ``barrier`` (L3M), ``lagrangian`` (the paper's MM baseline: λ ← max(0, λ + dual_lr·Ĉ),
            from ``dual_init``) or ``penalty`` (fixed ``penalty_weights``); see multipliers.py.
        infeasibility_patience: warn once when a constraint stays this many steps in the barrier's
            linear region (likely infeasible); 0 disables. Never-active constraints are reported at the end.
        sft_loss_reduction: ``"token"`` (the paper's: mean NLL per reference token) or ``"sequence"``
            (summed over each response, mean over responses). It sets how much the task loss resists
            a constraint: per token it resists ~1/(mean response length) as much, so the same
            barrier settles deeper inside the feasible set (see README, "Choosing scale, μ and the SFT reduction").
        learning_rate / weight_decay / warmup_ratio / min_lr_ratio: AdamW with linear warm-up then cosine.
        lora: PEFT ``LoraConfig`` fields (e.g. ``{r: 16, lora_alpha: 32}``) to train LoRA adapters only.
        merge_lora_on_export: export a plain merged model (default) or just the adapters.
        fused_forward: reference and sampled sequences share one padding-free forward/backward
            (packing.py); checked once against two padded passes, which it falls back to for a model
            that ignores packed position ids. bench/step_time.py times both.
        log_samples_every_n_steps: how often sampled prompt/response pairs go to TensorBoard as text.
        val_generate: sample responses to held-out prompts in validation/test and log constraint values.
        eval_num_samples: responses sampled per held-out prompt; each prompt's values are averaged, so the
            reported confidence intervals are over prompts.
        init_seed: seed of the embedded model's random init.
        export_dir: where the final policy and tokenizer are written with ``save_pretrained``
            (default: ``<log dir>/hf_model``); ``""`` disables export. Checked before the first step
            (outputs.check_fit_outputs): writable, and not someone else's non-empty folder.
        trust_remote_code: allow a model or tokenizer folder whose ``auto_map`` names Python code
            shipped with it (default false: such a folder fails at once, in one line). Also used
            for the data's tokenizer (the CLI links ``data.trust_remote_code`` to it).
    """

    def __init__(
        self,
        model_name_or_path: str = EMBEDDED,
        tokenizer_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        torch_dtype: str | None = None,
        trust_remote_code: bool = False,
        constraints: list[dict[str, Any]] | None = None,
        num_samples: int = 2,
        max_new_tokens: int = 64,
        generation_batch_size: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        mu_start: float = 1.0,
        mu_floor: float = 0.01,
        mu_decay: float = 0.9,
        mu_decay_every: int = 10,
        constraint_ema: float = 0.0,
        constraint_warmup_steps: int = 0,
        value_baseline: bool = False,
        value_head_lr: float = 1e-2,
        value_head_width: int = 0,
        gae_lambda: float = 1.0,
        method: str = "barrier",
        dual_lr: float = 0.1,
        dual_init: float | list[float] = 0.0,
        penalty_weights: list[float] | None = None,
        sft_loss_reduction: str = "token",
        infeasibility_patience: int = 200,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        fused_forward: bool = True,
        lora: dict[str, Any] | None = None,
        merge_lora_on_export: bool = True,
        log_samples_every_n_steps: int = 50,
        val_generate: bool = True,
        eval_num_samples: int = 1,
        export_dir: str | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"model.num_samples must be >= 1, got {num_samples}")
        if max_new_tokens < 1:
            raise ValueError(f"model.max_new_tokens must be >= 1, got {max_new_tokens}")
        if eval_num_samples < 1:
            raise ValueError(f"model.eval_num_samples must be >= 1, got {eval_num_samples}")
        if generation_batch_size is not None and generation_batch_size < 1:
            raise ValueError(f"model.generation_batch_size must be >= 1 sequences (or null for all), got {generation_batch_size}")
        if sft_loss_reduction not in ("token", "sequence"):
            raise ValueError(f"model.sft_loss_reduction must be 'token' or 'sequence', got {sft_loss_reduction!r}")
        if constraint_warmup_steps < 0:
            raise ValueError(f"model.constraint_warmup_steps must be >= 0 optimiser steps, got {constraint_warmup_steps}")
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        if not 0.0 <= gae_lambda <= 1.0:
            raise ValueError(f"model.gae_lambda must be in [0, 1], got {gae_lambda}")
        if gae_lambda < 1.0 and not value_baseline:
            raise ValueError(f"model.gae_lambda={gae_lambda} needs model.value_baseline: true (GAE bootstraps from V)")
        _check_options(locals())
        self.save_hyperparameters()
        self.constraints: list[Constraint] = build_constraints(constraints, where="model.constraints")
        self.mu_schedule = MuSchedule(start=mu_start, floor=mu_floor, factor=mu_decay, every=mu_decay_every)
        self.constraint_ema = ExponentialMovingAverage(constraint_ema)
        self.feasibility = FeasibilityMonitor([c.name for c in self.constraints], patience=infeasibility_patience)
        self.truncation = TruncationMonitor(max_new_tokens)
        self.no_valid_samples = NoValidSamplesMonitor([c.name for c in self.constraints])
        self.multiplier_rule = MultiplierRule(method, len(self.constraints), dual_lr, dual_init, penalty_weights)
        warn_all(option_warnings(self.constraints, num_samples, max_new_tokens, temperature, top_k, top_p, value_baseline,
                                 method, penalty_weights, dual_init, constraint_warmup_steps, constraint_ema))
        tokenizer_option = "model.tokenizer_name_or_path" if tokenizer_name_or_path else "model.model_name_or_path"
        self.tokenizer = load_tokenizer(tokenizer_name_or_path or model_name_or_path, trust_remote_code, option=tokenizer_option)
        self.model = load_policy(model_name_or_path, self.tokenizer, model_config, torch_dtype, seed=init_seed, trust_remote_code=trust_remote_code)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.model)  # sampling ends a response at any of these
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if lora is not None:
            self.model = apply_lora(self.model, lora)
        # optional learned per-token baseline (value_baseline.py); its parameters train alongside
        self.value_head = (TokenValueHead(self.model.config.hidden_size, len(self.constraints), max_new_tokens, value_head_width)
                           if value_baseline and self.constraints else None)
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.loaded_global_step = 0
        self._packing_ok: bool | None = None  # fused_forward: does the model honour packed position ids?
        # Held-out samples' values, gathered across ranks at epoch end (means and confidence intervals).
        self.eval_values = torch.nn.ModuleDict({key: CatMetric() for key in self._eval_metric_keys()})
        self.eval_samples: list[dict[str, Any]] = []  # a few held-out responses for report.md

    # --- the training step ----------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        rollouts = self.sample(batch, self.hparams.num_samples) if self.constraints_active() else None
        sft, pg = self.policy_logprobs(batch, rollouts)
        sft_loss, token_nll = self.reduce_sft_loss(sft.sums(), sft.counts())
        loss = sft_loss
        self.log_dict({"train/sft_loss": token_nll, "train/ppl": token_nll.exp()}, prog_bar=True)

        if rollouts is not None:
            rewards, costs, valid = self.score(batch, rollouts)
            estimates = self.all_reduced_means(costs, valid)
            smoothed = self.constraint_ema.update(estimates)  # = estimates unless constraint_ema > 0
            multipliers = self.multiplier_rule(smoothed, self.mu_schedule.mu)
            # this step's constraint tensors, for callbacks (the distributed tests read them)
            self.last_constraint_stats = {"costs": costs, "valid": valid, "estimates": estimates, "multipliers": multipliers}
            loss = loss + self.constraint_surrogate(pg, costs, valid, multipliers, rollouts.group_size)
            self.log("barrier/mu", self.mu_schedule.mu)
            # the barrier's linear region is Ĉ > −μ²; for the baselines, plain violation Ĉ > 0
            region_mu = self.mu_schedule.mu if self.hparams.method == "barrier" else 0.0
            self.feasibility.update(estimates.tolist(), multipliers.tolist(), region_mu)
            self.truncation.update(1.0 - rollouts.finished.float().mean().item())
            self.no_valid_samples.update(self._last_valid_counts.tolist(), self.global_step)
            self.log_constraints(rewards, costs, valid, estimates, multipliers, rollouts)
            if self.constraint_ema.decay:
                self.log_dict({f"constraints/{c.name}/value_ema": smoothed[i].float() for i, c in enumerate(self.constraints)})
            self.maybe_log_samples(batch, rollouts)
        elif self.value_head is not None:  # constraint warm-up: DDP/FSDP expect every parameter in the graph
            loss = loss + 0.0 * self.value_head().sum()
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # μ decays per optimiser step (not per batch, so gradient accumulation does not speed it
        # up), and before checkpoint callbacks run, so a checkpoint holds the μ of its step.
        super().optimizer_step(*args, **kwargs)
        if self.constraints_active():
            self.mu_schedule.step()

    def constraints_active(self) -> bool:
        """Constraints shape this step: there are some, and ``constraint_warmup_steps`` have passed."""
        return bool(self.constraints) and self.global_step >= self.hparams.constraint_warmup_steps

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None) -> None:
        """Clip by norm under FSDP1 too (``trainer.gradient_clip_val``, the paper's setting).

        Lightning's FSDP precision refuses norm clipping (its optimiser-level clip cannot see the
        other shards); FSDP's own ``clip_grad_norm_`` reduces the norm across all of them.
        """
        root = self.fsdp1_root()
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and root is not None:
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- pieces of the step -----------------------------------------------------------------------
    def policy_logprobs(self, batch: dict[str, Any], rollouts: Rollouts | None) -> tuple[TokenLogprobs, TokenLogprobs | None]:
        """log π of every labelled token: of the references, and of the samples if any.

        With ``fused_forward`` both sets go through one padding-free pass (packing.py): one
        forward/backward instead of two, and no compute on padding.
        """
        sft = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        if rollouts is None:
            return padded_token_logprobs(self.model, sft), None
        pg = (rollouts.input_ids, rollouts.attention_mask, rollouts.labels)
        hidden = self.value_head is not None
        if not self.packing_enabled([sft, pg]):
            return padded_token_logprobs(self.model, sft), padded_token_logprobs(self.model, pg, with_hidden=hidden)
        return packed_token_logprobs(self.model, pack([sft, pg], self.tokenizer.pad_token_id), with_hidden=hidden).split(len(sft[0]))

    def constraint_surrogate(self, pg: TokenLogprobs, costs: torch.Tensor, valid: torch.Tensor, multipliers: torch.Tensor, group_size: int) -> torch.Tensor:
        """Σ_i λ_i · (policy-gradient estimate of C_i): leave-one-out baseline, plus V's per-token shift if enabled."""
        costs, multipliers = costs.to(pg.logp), multipliers.to(pg.logp)
        if self.value_head is None:
            return policy_gradient_surrogate(pg.sums(), costs, multipliers, group_size, valid)
        values = self.value_head(pg)
        value_loss = self.value_head.loss(values, pg, costs, valid)
        self.log_dict({"train/value_baseline_mse": value_loss.detach(),
                       "train/value_baseline_explained": self.value_head.explained_variance(value_loss, pg, costs, valid)})
        shift = self.value_head.baseline_shift(values, pg)
        surrogate = token_level_surrogate(pg.logp, pg.sequence, shift, costs, multipliers, group_size, valid,
                                          token_position=pg.positions(), gae_lambda=self.hparams.gae_lambda)
        return surrogate + value_loss

    def packing_enabled(self, parts) -> bool:
        """``fused_forward``, once the model is seen to honour packed position ids (checked on the first batch)."""
        if not self.hparams.fused_forward:
            return False
        if self._packing_ok is None:
            ok = torch.tensor(float(packing_matches_padding(self.model, parts, self.tokenizer.pad_token_id)), device=self.device)
            if self._trainer is not None:  # every rank must take the same path: FSDP forwards are collective
                ok = self.trainer.strategy.reduce(ok, reduce_op="mean")
            self._packing_ok = bool(ok.item() == 1.0)
            if not self._packing_ok:
                rank_zero_warn(f"model.fused_forward: {type(self.model).__name__} attends across packed sequences "
                               "(it ignores position_ids restarts); using two padded passes instead")
        return self._packing_ok

    def reduce_sft_loss(self, logp: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The SFT loss (per token by default, or per response) and the detached per-token NLL.

        ``logp``/``tokens``: each reference response's summed log-prob and token count.
        """
        token_nll = -logp.sum() / tokens.sum().clamp(min=1)
        loss = -logp.sum() / logp.shape[0] if self.hparams.sft_loss_reduction == "sequence" else token_nll
        return loss, token_nll.detach()

    def sft_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """SFT loss of a batch on its own (see ``reduce_sft_loss``)."""
        scored = padded_token_logprobs(self.model, (batch["input_ids"], batch["attention_mask"], batch["labels"]))
        return self.reduce_sft_loss(scored.sums(), scored.counts())

    def sample(self, batch: dict[str, Any], num_samples: int) -> Rollouts:
        hp = self.hparams
        sharded = self.params_sharded()
        with unsharded_for_generation(self.model) if sharded else nullcontext(False) as gathered:
            return sample_rollouts(
                self.model,
                batch["prompt_input_ids"],
                batch["prompt_attention_mask"],
                num_samples=num_samples,
                max_new_tokens=hp.max_new_tokens,
                eos_token_id=self.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                temperature=hp.temperature,
                top_k=hp.top_k,
                top_p=hp.top_p,
                # gathered parameters: no collectives while decoding, each rank stops on its own
                synced_gpus=sharded and not gathered and self.trainer.world_size > 1,
                max_rows_per_call=hp.generation_batch_size,
            )

    def fsdp1_root(self) -> torch.nn.Module | None:
        """The ``FullyShardedDataParallel`` wrapping this module under ``FSDPStrategy``, else ``None``."""
        if self._trainer is None:
            return None
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        return root if isinstance(root, FullyShardedDataParallel) else None

    def params_sharded(self) -> bool:
        """True under FSDP1/FSDP2 (one rank too): parameters must be gathered to generate or export."""
        from torch.distributed.tensor import DTensor

        return self.fsdp1_root() is not None or any(isinstance(p, DTensor) for p in self.model.parameters())

    def score(self, batch: dict[str, Any], rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rewards, normalised costs and validity masks, each ``[k, N]`` (float64 / bool, on device)."""
        prompts = [batch["prompts"][i] for i in rollouts.prompt_index.tolist()]
        completions = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        rewards, valid = zip(*(c.evaluate(prompts, completions, rollouts.completion_ids) for c in self.constraints))
        rewards_t = torch.stack(rewards).to(self.device)
        costs = torch.stack([c.cost(r) for c, r in zip(self.constraints, rewards_t)])
        return rewards_t, costs, torch.stack(valid).to(self.device)

    def all_reduced_means(self, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-constraint mean over the valid samples of *all* ranks, so every rank gets the same λ."""
        sums = torch.stack([torch.where(valid, values, 0.0).sum(dim=1), valid.sum(dim=1).to(values.dtype)])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum") if self._trainer is not None else sums
        self._last_valid_counts = sums[1]  # all ranks' valid samples per constraint (NoValidSamplesMonitor)
        return sums[0] / sums[1].clamp(min=1)

    # --- logging --------------------------------------------------------------------------------
    def log_constraints(self, rewards, costs, valid, estimates, multipliers, rollouts: Rollouts) -> None:
        metrics = {"completions/mean_length": float(sum(map(len, rollouts.completion_ids))) / len(rollouts.completion_ids)}
        metrics["completions/finished_fraction"] = rollouts.finished.float().mean()
        for i, c in enumerate(self.constraints):
            prefix = f"constraints/{c.name}"
            metrics[f"{prefix}/value"] = estimates[i]
            metrics[f"{prefix}/reward"] = masked_mean(rewards[i], valid[i])
            metrics[f"{prefix}/lambda"] = multipliers[i]
            metrics[f"{prefix}/satisfied"] = (estimates[i] <= 0).float()
            metrics[f"{prefix}/valid_fraction"] = valid[i].float().mean()
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()})

    def maybe_log_samples(self, batch: dict[str, Any], rollouts: Rollouts, max_rows: int = 4) -> None:
        every = self.hparams.log_samples_every_n_steps
        if not every or self._trainer is None or self.global_step % every or not self.trainer.is_global_zero:
            return
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        rows = []
        for j in range(min(max_rows, len(rollouts.completion_ids))):
            prompt = batch["prompts"][int(rollouts.prompt_index[j])]
            completion = self.tokenizer.decode(rollouts.completion_ids[j], skip_special_tokens=True)
            rows.append(f"**prompt:** {prompt}\n\n**response ({len(rollouts.completion_ids[j])} tokens):** {completion}")
        experiment.add_text("samples", "\n\n---\n\n".join(rows), global_step=self.global_step)

    # --- held-out evaluation --------------------------------------------------------------------
    def _eval_metric_keys(self) -> list[str]:
        keys = ["length", "response_length", "finished"] + [f"{c.name}__{kind}" for c in self.constraints for kind in ("cost", "reward")]
        return keys  # ModuleDict keys cannot contain '.' or '/'

    def _eval_step(self, batch: dict[str, Any]) -> None:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        self.val_ppl.update(logits[:, :-1].float(), batch["labels"][:, 1:])
        if not self.hparams.val_generate:
            return
        k = self.hparams.eval_num_samples
        rollouts = self.sample(batch, num_samples=k)
        lengths = torch.tensor([float(len(ids)) for ids in rollouts.completion_ids], device=self.device)
        self.eval_values["length"].update(lengths.view(-1, k).mean(dim=1))
        self.eval_values["response_length"].update(lengths)  # the distribution, one value per response
        self.eval_values["finished"].update(rollouts.finished.float())  # ended at a stop token, not at max_new_tokens
        self.keep_eval_samples(batch, rollouts)
        if self.constraints:
            rewards, costs, valid = self.score(batch, rollouts)
            for i, c in enumerate(self.constraints):
                # one value per prompt (the mean of its valid samples): the confidence intervals are over prompts
                counts = valid[i].view(-1, k).sum(dim=1)
                if counts.any():
                    for key, values in ((f"{c.name}__cost", costs[i]), (f"{c.name}__reward", rewards[i])):
                        per_prompt = torch.where(valid[i], values, 0.0).view(-1, k).sum(dim=1) / counts.clamp(min=1)
                        self.eval_values[key].update(per_prompt[counts > 0].float())

    def keep_eval_samples(self, batch: dict[str, Any], rollouts: Rollouts, max_rows: int = 6) -> None:
        """The first few held-out (prompt, response) pairs on rank 0, for the report: numbers need reading beside answers."""
        if len(self.eval_samples) >= max_rows or (self._trainer is not None and not self.trainer.is_global_zero):
            return
        for j in range(0, len(rollouts.completion_ids), rollouts.group_size):  # the first sample of each prompt
            if len(self.eval_samples) < max_rows:
                self.eval_samples.append({
                    "prompt": batch["prompts"][int(rollouts.prompt_index[j])],
                    "response": self.tokenizer.decode(rollouts.completion_ids[j], skip_special_tokens=True),
                    "num_tokens": len(rollouts.completion_ids[j]), "finished": bool(rollouts.finished[j])})

    def _eval_epoch_end(self, prefix: str) -> None:
        """Log held-out ppl and per-constraint mean ± 95% CI; stand-alone validate/test also write report.json/.md."""
        # validate/test do not restore the trainer's step: report the step the weights were trained to
        step = self.global_step or self.loaded_global_step
        report: dict[str, Any] = {"split": prefix, "global_step": step, "ppl": self.val_ppl.compute().item()}
        self.log(f"{prefix}/ppl", report["ppl"], prog_bar=True)
        self.val_ppl.reset()
        values = {k: m.compute() if m.update_called else torch.empty(0) for k, m in self.eval_values.items()}
        for metric in self.eval_values.values():
            metric.reset()
        if values["length"].numel():
            report["mean_length"] = mean_confidence_interval(values["length"])
            report["finished_fraction"] = values["finished"].mean().item()
            report["response_lengths"] = values["response_length"].int().tolist()
            report["samples"], self.eval_samples = self.eval_samples, []
            self.log(f"{prefix}/completions/mean_length", report["mean_length"]["mean"])
            self.log(f"{prefix}/completions/finished_fraction", report["finished_fraction"])
        report["constraints"] = []
        for c in self.constraints:
            if not values[f"{c.name}__cost"].numel():
                continue
            row = constraint_row(c.name, c.sense, c.threshold, values[f"{c.name}__reward"], values[f"{c.name}__cost"])
            report["constraints"].append(row)
            base = f"{prefix}/constraints/{c.name}"
            self.log_dict({f"{base}/value": row["value"]["mean"], f"{base}/reward": row["reward"]["mean"],
                           f"{base}/reward_ci_low": row["reward"]["low"], f"{base}/reward_ci_high": row["reward"]["high"],
                           f"{base}/satisfied": float(row["holds"])})
        stand_alone = self.trainer.state.fn in ("validate", "test")
        if stand_alone and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            write_report(self.trainer.log_dir or self.trainer.default_root_dir, report)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        rollouts = self.sample(batch, num_samples=1)
        texts = self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        return [
            {"prompt": p, "completion": t, "num_tokens": len(ids)}
            for p, t, ids in zip(batch["prompts"], texts, rollouts.completion_ids)
        ]

    def configure_callbacks(self) -> list[L.Callback]:
        return [JsonlPredictionWriter(), ExactResume()]  # ExactResume: RNG streams and data order survive a resume

    # --- optimisation ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        """FSDP2 under ``ModelParallelStrategy``: ``fully_shard`` each decoder layer, then the root.

        A no-op under every other strategy (no device mesh). Decoder layers are the model's
        ``_no_split_modules`` classes (``LlamaDecoderLayer`` for the embedded model), so any Hugging
        Face causal LM is sharded per block. Forward hooks unshard parameters, so ``generate`` works.
        """
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_fully_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError("L3MModule supports FSDP2 data parallelism only: set tensor_parallel_size=1")
        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        block_names = set(getattr(self.model, "_no_split_modules", None) or [])
        for module in list(self.model.modules()):
            if type(module).__name__ in block_names:
                fully_shard(module, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)
        if self.value_head is not None:  # so its gradients are reduced across ranks too
            fully_shard(self.value_head, mesh=dp_mesh)
        self._fully_sharded = True

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.dim() < 2 else decay).append(param)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.value_head is not None:
            groups.append({"params": list(self.value_head.parameters()), "weight_decay": 0.0, "lr": hp.value_head_lr})
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = warmup_cosine(optimizer, total_steps=total, warmup_steps=math.ceil(hp.warmup_ratio * total), min_lr_ratio=hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- state and outputs ----------------------------------------------------------------------
    def setup_constraints(self) -> None:
        """Put constraint models (reward models) on this device; cheap after the first call."""
        for c in self.constraints:
            c.setup(self.device)

    def on_validation_start(self) -> None:
        self.setup_constraints()

    def on_test_start(self) -> None:
        self.setup_constraints()

    def on_predict_start(self) -> None:
        self.setup_constraints()

    def on_fit_start(self) -> None:
        # before the first step: a folder that cannot be written fails now, not at the first save or after the last step
        check_fit_outputs(self.trainer, self.hparams.export_dir, self.trainer.ckpt_path)
        self.warn_if_constraints_never_start()
        self.setup_constraints()
        if self.trainer.world_size > 1:
            # seed_everything gives every rank the same stream; sampling must differ across ranks or
            # their responses are correlated and more ranks do not reduce the estimator's variance
            # (on resume, ExactResume puts each rank's saved streams back after this, in on_train_start)
            torch.manual_seed((torch.initial_seed() + 1_000_003 * self.global_rank) % 2**63)

    def warn_if_constraints_never_start(self) -> None:
        """The warm-up outlasts ``trainer.max_steps``: the whole run would be plain SFT, though constraints are configured."""
        warmup, max_steps = self.hparams.constraint_warmup_steps, self.trainer.max_steps
        if self.constraints and warmup and max_steps is not None and 0 <= max_steps <= warmup:
            rank_zero_warn(f"model.constraint_warmup_steps={warmup} >= trainer.max_steps={max_steps}: the constraints never "
                           "switch on and this run is plain SFT; lower the warm-up or raise max_steps")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["l3m"] = {
            "mu_schedule": self.mu_schedule.state_dict(),
            "constraint_ema": self.constraint_ema.state_dict(),
            "multipliers": self.multiplier_rule.state_dict(),
            "feasibility": self.feasibility.state_dict(),
            "constraints": {c.name: c.state_dict() for c in self.constraints},
            "packing_ok": self._packing_ok,  # a resumed run does not re-run the check's forward passes (dropout draws)
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_global_step = int(checkpoint.get("global_step", 0))
        state = checkpoint.get("l3m")
        if state is None:
            return
        self.mu_schedule.load_state_dict(state["mu_schedule"])
        self.constraint_ema.load_state_dict(state["constraint_ema"])
        if "multipliers" in state:
            self.multiplier_rule.load_state_dict(state["multipliers"])
        if "feasibility" in state:
            self.feasibility.load_state_dict(state["feasibility"])
        if state.get("packing_ok") is not None:
            self._packing_ok = bool(state["packing_ok"])
        for c in self.constraints:
            if c.name in state["constraints"]:
                c.load_state_dict(state["constraints"][c.name])

    def on_fit_end(self) -> None:
        """Export the policy and tokenizer with ``save_pretrained`` so any Hugging Face tool loads them."""
        if self.constraints and self.hparams.method == "barrier":
            self.feasibility.at_end()
        target = self.export_path()
        if target is None:
            return
        state_dict = self.full_policy_state_dict()  # collective under FSDP: every rank calls it
        if not self.trainer.is_global_zero:
            return
        model = self.model
        if self.hparams.lora is not None and self.hparams.merge_lora_on_export:
            import copy

            model = copy.deepcopy(model).merge_and_unload()  # a plain model; training state untouched
        save_pretrained_atomically(target, model, self.tokenizer, marker=export_marker(self.trainer), state_dict=state_dict)

    def full_policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The policy's full (unsharded, CPU) state dict under FSDP1/FSDP2, else ``None`` (use the module's own)."""
        if not self.params_sharded():
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        root = self.fsdp1_root()
        if root is not None:  # FSDP1 wraps the LightningModule: keys are "model.<policy key>"
            full = get_model_state_dict(root, options=options)
            return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
        return get_model_state_dict(self.model, options=options)

    def export_path(self) -> Path | None:
        return resolve_export_dir(self.hparams.export_dir, self.trainer)


def _check_options(o: dict[str, Any]) -> None:
    """Ranges the step relies on, each failing in one line that names the YAML key (``model.mu_floor``), before any model loads."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    for key in ("mu_start", "mu_floor"):
        need(number(o[key]) and o[key] > 0, f"model.{key} must be a finite number > 0, got {o[key]!r}")
    need(o["mu_floor"] <= o["mu_start"], f"model.mu_floor ({o['mu_floor']:g}) must be <= model.mu_start ({o['mu_start']:g}): μ decays from mu_start down to mu_floor")
    need(number(o["mu_decay"]) and 0 < o["mu_decay"] <= 1, f"model.mu_decay must be in (0, 1] (μ ← mu_decay·μ), got {o['mu_decay']!r}")
    need(isinstance(o["mu_decay_every"], int) and o["mu_decay_every"] >= 1, f"model.mu_decay_every must be a positive number of steps, got {o['mu_decay_every']!r}")
    need(number(o["constraint_ema"]) and 0 <= o["constraint_ema"] < 1, f"model.constraint_ema must be in [0, 1) (0 = off), got {o['constraint_ema']!r}")
    need(number(o["learning_rate"]) and o["learning_rate"] > 0, f"model.learning_rate must be > 0, got {o['learning_rate']!r}")
    need(number(o["value_head_lr"]) and o["value_head_lr"] > 0, f"model.value_head_lr must be > 0, got {o['value_head_lr']!r}")
    need(number(o["weight_decay"]) and o["weight_decay"] >= 0, f"model.weight_decay must be >= 0, got {o['weight_decay']!r}")
    need(number(o["warmup_ratio"]) and 0 <= o["warmup_ratio"] <= 1, f"model.warmup_ratio must be in [0, 1], got {o['warmup_ratio']!r}")
    need(number(o["min_lr_ratio"]) and 0 <= o["min_lr_ratio"] <= 1, f"model.min_lr_ratio must be in [0, 1], got {o['min_lr_ratio']!r}")
    betas = o["betas"]
    need(len(betas) == 2 and all(number(b) and 0 <= b < 1 for b in betas), f"model.betas must be two numbers in [0, 1), got {betas!r}")
    need(o["value_head_width"] >= 0, f"model.value_head_width must be >= 0 (0 = a linear head), got {o['value_head_width']!r}")
    need(o["top_k"] >= 0, f"model.top_k must be >= 0 (0 = off), got {o['top_k']!r}")
    need(number(o["top_p"]) and 0 < o["top_p"] <= 1, f"model.top_p must be in (0, 1], got {o['top_p']!r}")
    need(o["infeasibility_patience"] >= 0, f"model.infeasibility_patience must be >= 0 steps (0 = off), got {o['infeasibility_patience']!r}")
    need(o["log_samples_every_n_steps"] >= 0, f"model.log_samples_every_n_steps must be >= 0 (0 = off), got {o['log_samples_every_n_steps']!r}")
    dtype = o["torch_dtype"]
    need(dtype is None or isinstance(getattr(torch, str(dtype), None), torch.dtype),
         f"model.torch_dtype must be a torch dtype name such as float32, bfloat16 or float16, got {dtype!r}")
