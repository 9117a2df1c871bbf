"""L3MModule: SFT loss plus the relaxed log-barrier on sampled-response constraints.

The training step (method.md §5), top to bottom in ``training_step``:

1. Sample K responses per prompt (no grad, KV cache, stop at EOS) — ``sample``.
2. Forward passes over the reference and the sampled sequences (one packed pass, or two padded):
   SFT NLL of the references (prompt tokens masked) and log π of every sampled token — ``policy_logprobs``.
3. The constrained objective (``objective.ConstrainedObjective.step``): score every constraint;
   Ĉ_i = mean of c_ij (all-reduced across ranks); λ_i = B'_μ(Ĉ_i)/k (or a baseline's λ); the
   surrogate Σ_i sg(λ_i) · mean_j[sg(c_ij − β_ij) · log π(y_j|x_j)], β = leave-one-out (with the value
   baseline each token's β also gets V(x, y_<t) − V(x)).
4. loss = L_sft + the surrogate; one optimiser step (Lightning); μ decays on schedule after it.

With no constraints it is plain SFT. The options come in groups (``l3m_lightning.options``):
``model.policy``, ``model.sampling``, ``model.barrier``, ``model.multipliers``, ``model.value_baseline``,
``model.optimizer``, ``model.evaluation``; ``module.options`` holds them typed.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import CatMetric
from torchmetrics.text import Perplexity

from constraints import Constraint, build_constraints
from l3m_lightning.attention import attention_kernels
from l3m_lightning.callbacks import JsonlPredictionWriter
from l3m_lightning.checkpointing import ExactResume
from l3m_lightning.constants import IGNORE_INDEX
from l3m_lightning.diagnostics import option_warnings, warn_all
from l3m_lightning.logprobs import (
    Agreement, SharedPrompt, TokenLogprobs, head_matches_logits, output_layer, pack, packed_token_logprobs, packing_matches_padding,
    padded_token_logprobs, share_prompts, shared_prompt_token_logprobs, sharing_matches_padding,
)
from l3m_lightning.objective import ConstrainedObjective, ObjectiveStep
from l3m_lightning.optim import adamw_warmup_cosine
from l3m_lightning.options import (
    GROUPS, BarrierArgs, EvaluationArgs, L3MOptions, MultiplierArgs, OptimizerArgs, PolicyArgs, SamplingArgs, ValueBaselineArgs, as_group,
    upgrade_hparams,
)
from l3m_lightning.outputs import check_fit_outputs, export_marker, resolve_export_dir, save_pretrained_atomically
from l3m_lightning.policy import apply_lora, load_policy, load_tokenizer, stop_token_ids
from l3m_lightning.report import constraint_row, mean_confidence_interval, write_report
from l3m_lightning.sampling import Rollouts, sample_rollouts
from l3m_lightning.sharding import fsdp1_root, full_state_dict, params_sharded, shard_blocks, unsharded_for_generation


class L3MModule(L.LightningModule):
    """Constrained fine-tuning of a causal LM with the L3M relaxed log-barrier.

    Args:
        policy: the causal LM, its tokenizer and how it trains (``PolicyArgs``).
        constraints: entries ``{name: length, threshold: 20, sense: at_most, scale: 10}`` or
            ``{class_path: ..., init_args: {...}}``; empty means plain SFT.
        sft_loss_reduction: ``token`` (the paper's: mean NLL per reference token) or ``sequence``
            (summed over each response, mean over responses). Per token the task loss resists a
            constraint ~1/(mean response length) as much, so the same barrier settles deeper inside
            the feasible set.
        sampling: K responses per prompt and how they are sampled (``SamplingArgs``).
        barrier: the μ schedule and the constraint warm-up (``BarrierArgs``).
        multipliers: how λ is set from Ĉ: barrier, lagrangian or penalty; the EMA of Ĉ (``MultiplierArgs``).
        value_baseline: the optional learned per-token baseline (``ValueBaselineArgs``).
        optimizer: AdamW with linear warm-up then cosine (``OptimizerArgs``).
        evaluation: held-out sampling and logged samples (``EvaluationArgs``).
        export_dir: where the final policy and tokenizer are written with ``save_pretrained``
            (default: ``<log dir>/hf_model``); ``""`` disables export. Checked before the first step.
    """

    def __init__(
        self,
        policy: PolicyArgs = PolicyArgs(),
        constraints: list[dict[str, Any]] | None = None,
        sft_loss_reduction: str = "token",
        sampling: SamplingArgs = SamplingArgs(),
        barrier: BarrierArgs = BarrierArgs(),
        multipliers: MultiplierArgs = MultiplierArgs(),
        value_baseline: ValueBaselineArgs = ValueBaselineArgs(),
        optimizer: OptimizerArgs = OptimizerArgs(),
        evaluation: EvaluationArgs = EvaluationArgs(),
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        # a mapping works too (hparams of a checkpoint, or Python callers): each group checks its own ranges
        given = {"policy": policy, "sampling": sampling, "barrier": barrier, "multipliers": multipliers,
                 "value_baseline": value_baseline, "optimizer": optimizer, "evaluation": evaluation}
        groups = {name: as_group(GROUPS[name], value) for name, value in given.items()}
        if sft_loss_reduction not in ("token", "sequence"):
            raise ValueError(f"model.sft_loss_reduction must be 'token' or 'sequence', got {sft_loss_reduction!r}")
        self.options = o = L3MOptions(constraints=constraints, sft_loss_reduction=sft_loss_reduction, export_dir=export_dir, **groups)
        self.save_hyperparameters()
        for name, group in groups.items():  # plain values in hparams.yaml and checkpoints, however the module was built
            self.hparams[name] = group.to_dict()
        self._hparams_initial = copy.deepcopy(self._hparams)

        built: list[Constraint] = build_constraints(constraints, where="model.constraints")
        m = o.multipliers
        warn_all(option_warnings(built, o.sampling.num_samples, o.sampling.max_new_tokens, o.sampling.temperature, o.sampling.top_k,
                                 o.sampling.top_p, o.value_baseline.enabled, m.method, m.penalty_weights, m.dual_init,
                                 o.barrier.warmup_steps, m.ema))
        p = o.policy
        tokenizer_option = "model.policy.tokenizer_name_or_path" if p.tokenizer_name_or_path else "model.policy.name_or_path"
        self.tokenizer = load_tokenizer(p.tokenizer_name_or_path or p.name_or_path, p.trust_remote_code, option=tokenizer_option,
                                        allow_key="model.policy.trust_remote_code")
        self.model = load_policy(p.name_or_path, self.tokenizer, p.config, p.torch_dtype, seed=p.init_seed,
                                 trust_remote_code=p.trust_remote_code, option="model.policy.name_or_path")
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.model)  # sampling ends a response at any of these
        if p.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if p.lora is not None:
            self.model = apply_lora(self.model, p.lora)
        self.objective = ConstrainedObjective(built, o.barrier, o.multipliers, o.value_baseline, o.sampling.max_new_tokens,
                                              hidden_size=self.model.config.hidden_size)
        self.last_step: ObjectiveStep | None = None  # this step's constraint quantities, for callbacks (the distributed tests)
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.loaded_global_step = 0
        self._packing_ok: bool | None = None  # fused_forward: does the model honour packed position ids?
        self._sharing_ok: bool | None = None  # share_prompts: does it score a response on its prompt's cache as the whole row?
        self._head_ok: bool | None = None  # are its logits its output layer on its last hidden states (logits at scored tokens only)?
        # Held-out samples' values, gathered across ranks at epoch end (means and confidence intervals).
        self.eval_values = torch.nn.ModuleDict({key: CatMetric() for key in self._eval_metric_keys()})
        self.eval_samples: list[dict[str, Any]] = []  # a few held-out responses for report.md

    @property
    def constraints(self) -> list[Constraint]:
        return self.objective.constraints

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None, **kwargs: Any) -> "L3MModule":
        """Lightning's ``load_from_checkpoint``; a checkpoint written before the option groups (flat keys) has its hyperparameters moved into them."""
        if hparams_file is None and isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_file():
            saved = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=False).get("hyper_parameters", {})
            upgraded = upgrade_hparams(saved)
            if upgraded != dict(saved):
                import tempfile

                import yaml

                with tempfile.TemporaryDirectory() as folder:
                    hparams_file = Path(folder) / "hparams.yaml"
                    hparams_file.write_text(yaml.safe_dump(upgraded))
                    return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file, **kwargs)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file, **kwargs)

    @staticmethod
    def upgrade_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
        """Saved hyperparameters with the flat keys of before the option groups moved into them (the CLI's ``--ckpt_path``)."""
        return upgrade_hparams(hparams)

    # --- the training step ----------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with attention_kernels(self.options.policy.cudnn_attention):  # no cuDNN attention plan per new shape (attention.py)
            rollouts = self.sample(batch, self.options.sampling.num_samples) if self.constraints_active() else None
            sft, pg = self.policy_logprobs(batch, rollouts)
            sft_loss, token_nll = self.reduce_sft_loss(sft.sums(), sft.counts())
            self.log_dict({"train/sft_loss": token_nll, "train/ppl": token_nll.exp()}, prog_bar=True)
            if rollouts is None:  # plain SFT, or the constraint warm-up
                idle = self.objective.idle_loss()  # DDP/FSDP expect every parameter in the graph
                return sft_loss if idle is None else sft_loss + idle
            completions = self.decode(rollouts)
            step = self.objective.step(batch["prompts"], completions, rollouts, pg, columns=dataset_columns(batch),
                                       reduce_sum=self.reduce_sum, global_step=self.global_step)
        self.last_step = step
        self.log_step(step, rollouts)
        self.maybe_log_samples(batch, rollouts, completions)
        return sft_loss + step.loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        with attention_kernels(self.options.policy.cudnn_attention):  # gradient checkpointing runs forwards here
            super().backward(loss, *args, **kwargs)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # μ decays per optimiser step (not per batch, so gradient accumulation does not speed it
        # up), and before checkpoint callbacks run, so a checkpoint holds the μ of its step.
        super().optimizer_step(*args, **kwargs)
        if self.constraints_active():
            self.objective.after_optimizer_step()

    def constraints_active(self) -> bool:
        """Constraints shape this step: there are some, and ``barrier.warmup_steps`` have passed."""
        return self.objective.active(self.global_step)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None) -> None:
        """Clip under FSDP1 and under bf16-mixed with the fused AdamW too (``trainer.gradient_clip_val``, the paper's setting).

        Lightning's FSDP precision refuses norm clipping (its optimiser-level clip cannot see the
        other shards); FSDP's own ``clip_grad_norm_`` reduces the norm across all of them. Its mixed
        precision refuses any clipping for a fused optimizer (see below).
        """
        root = fsdp1_root(self._trainer)
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and root is not None:
            root.clip_grad_norm_(gradient_clip_val)
            return
        precision = getattr(self._trainer, "precision_plugin", None)
        if (gradient_clip_val and isinstance(precision, MixedPrecision) and loss_scaler(self._trainer) is None
                and getattr(optimizer, "_step_supports_amp_scaling", False)):
            # Lightning's mixed precision refuses to clip for a fused optimizer, whose step would unscale fp16 gradients
            # only after clipping; under bf16-mixed nothing is scaled, the gradients are the true ones: Lightning's own
            # clip (its base precision's), without the refusal
            Precision.clip_gradients(precision, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- pieces of the step -----------------------------------------------------------------------
    def sample(self, batch: dict[str, Any], num_samples: int) -> Rollouts:
        """``num_samples`` responses per prompt of ``batch`` (no gradient), gathering sharded parameters once."""
        s = self.options.sampling
        sharded = params_sharded(self.model, self._trainer)
        with unsharded_for_generation(self.model) if sharded else nullcontext(False) as gathered:
            return sample_rollouts(
                self.model,
                batch["prompt_input_ids"],
                batch["prompt_attention_mask"],
                num_samples=num_samples,
                max_new_tokens=s.max_new_tokens,
                eos_token_id=self.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                # gathered parameters: no collectives while decoding, each rank stops on its own
                synced_gpus=sharded and not gathered and self.trainer.world_size > 1,
                max_rows_per_call=s.generation_batch_size,
                min_new_tokens=s.min_new_tokens,
                decoder=s.decoder,
                onednn=s.onednn,
                cuda_graphs=s.cuda_graphs,
            )

    def decode(self, rollouts: Rollouts) -> list[str]:
        """The sampled responses as text (what constraints score)."""
        return self.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)

    def policy_logprobs(self, batch: dict[str, Any], rollouts: Rollouts | None) -> tuple[TokenLogprobs, TokenLogprobs | None]:
        """log π of every labelled token: of the references, and of the samples if any.

        With ``policy.share_prompts`` each prompt goes through the model once for its reference and its
        K samples (a shared cache: logprobs.py) whenever that computes fewer positions than the
        alternative. Otherwise, with ``policy.fused_forward``, both sets go through one padding-free
        pass: one forward/backward instead of two, and no compute on padding. Either way, with
        ``policy.scored_logits_only`` the logits are computed for the scored tokens alone
        (``scoring_head``). The samples' last hidden states come along when the objective has a value head.
        """
        sft = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        head = self.scoring_head(sft)
        if rollouts is None:
            return padded_token_logprobs(self.model, sft, head=head), None
        pg = (rollouts.input_ids, rollouts.attention_mask, rollouts.labels)
        hidden = self.objective.value_head is not None
        shared = self.shared_prompt_layout(batch, sft, pg, rollouts)
        if shared is not None:
            return shared_prompt_token_logprobs(self.model, shared, with_hidden=hidden, head=head).split(len(sft[0]))
        if not self.packing_enabled([sft, pg]):
            return padded_token_logprobs(self.model, sft, head=head), padded_token_logprobs(self.model, pg, with_hidden=hidden, head=head)
        packed = pack([sft, pg], self.tokenizer.pad_token_id)
        return packed_token_logprobs(self.model, packed, with_hidden=hidden, head=head).split(len(sft[0]))

    def scoring_head(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.nn.Module | None:
        """The output layer, to compute logits at scored tokens only; ``None`` (every position's logits) when it cannot.

        ``policy.scored_logits_only``. Scored tokens are a fraction of the positions a pass computes (not
        the prompts, padding or the last token of each row), and each position's logits are a
        vocabulary-sized row to compute, copy and back-propagate. Used once a batch shows that the model's logits are this layer on its
        last hidden states (checked once, as packing is); never under sharded parameters, whose output
        layer is gathered only inside the model's forward.
        """
        if not self.options.policy.scored_logits_only or self._head_ok is False or params_sharded(self.model, self._trainer):
            return None
        head = output_layer(self.model)
        if head is None:
            self._head_ok = False
            return None
        if self._head_ok is None:
            self._head_ok = self.on_every_rank(head_matches_logits(self.model, head, batch))
        return head if self._head_ok else None

    def shared_prompt_layout(self, batch: dict[str, Any], sft, pg, rollouts: Rollouts) -> SharedPrompt | None:
        """The shared-prompt layout of this step's rows when it is on, exact for this model, and cheaper; else ``None``.

        Cheaper: fewer positions than the packed pass (or the two padded ones). Every rank takes the
        same path (FSDP forwards are collective). Off under gradient checkpointing, which drops caches.
        """
        p = self.options.policy
        if not p.share_prompts or p.gradient_checkpointing or self._sharing_ok is False:
            return None
        shared = share_prompts(batch["prompt_input_ids"], batch["prompt_attention_mask"],
                               [(sft, torch.arange(len(sft[0]), device=self.device)), (pg, rollouts.prompt_index)], self.tokenizer.pad_token_id)
        if p.fused_forward:
            alternative = int(sft[1].sum() + pg[1].sum())
        else:
            alternative = sft[0].numel() + pg[0].numel()
        if not self.on_every_rank(shared is not None and shared.tokens() < alternative):
            return None
        if self._sharing_ok is None:
            agreement = sharing_matches_padding(self.model, shared, [sft, pg])
            self._sharing_ok = self.on_every_rank(agreement)
            if not self._sharing_ok:
                rank_zero_warn(f"model.policy.share_prompts: {type(self.model).__name__} does not score a response on its prompt's "
                               f"cache as it scores the whole row{_detail(agreement)}; scoring whole rows instead")
                return None
        return shared

    def on_every_rank(self, flag: bool) -> bool:
        """``flag`` held on every rank: every rank must take the same path (FSDP forwards are collective).

        One process (or no trainer): ``flag`` itself, with no tensor and no device sync.
        """
        if self._trainer is None or self.trainer.world_size == 1:
            return bool(flag)
        agreed = self.trainer.strategy.reduce(torch.tensor(float(bool(flag)), device=self.device), reduce_op="mean")
        return bool(agreed.item() == 1.0)

    def packing_enabled(self, parts) -> bool:
        """``policy.fused_forward``, once the model is seen to honour packed position ids (checked on the first batch)."""
        if not self.options.policy.fused_forward:
            return False
        if self._packing_ok is None:
            agreement = packing_matches_padding(self.model, parts, self.tokenizer.pad_token_id)
            self._packing_ok = self.on_every_rank(agreement)
            if not self._packing_ok:
                rank_zero_warn(f"model.policy.fused_forward: {type(self.model).__name__} scores packed sequences unlike padded rows"
                               f"{_detail(agreement)}: it attends across them (ignoring position_ids restarts); using two padded passes instead")
        return self._packing_ok

    def reduce_sft_loss(self, logp: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The SFT loss (per token by default, or per response) and the detached per-token NLL.

        ``logp``/``tokens``: each reference response's summed log-prob and token count.
        """
        token_nll = -logp.sum() / tokens.sum().clamp(min=1)
        loss = -logp.sum() / logp.shape[0] if self.options.sft_loss_reduction == "sequence" else token_nll
        return loss, token_nll.detach()

    def sft_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """SFT loss of a batch on its own (see ``reduce_sft_loss``)."""
        scored = padded_token_logprobs(self.model, (batch["input_ids"], batch["attention_mask"], batch["labels"]))
        return self.reduce_sft_loss(scored.sums(), scored.counts())

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (the identity without a trainer or on one process)."""
        return self.trainer.strategy.reduce(values, reduce_op="sum") if self._trainer is not None else values

    def score(self, batch: dict[str, Any], rollouts: Rollouts, completions: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rewards, normalised costs and validity masks of ``rollouts``, each ``[k, N]`` (the objective's ``score``)."""
        completions = self.decode(rollouts) if completions is None else completions
        return self.objective.score(batch["prompts"], completions, rollouts, dataset_columns(batch))

    # --- logging --------------------------------------------------------------------------------
    def log_step(self, step: ObjectiveStep, rollouts: Rollouts) -> None:
        """barrier/mu, constraints/<name>/*, completions/* and the value head's fit, for TensorBoard."""
        metrics: dict[str, Any] = {"completions/mean_length": float(sum(map(len, rollouts.completion_ids))) / len(rollouts.completion_ids)}
        metrics["completions/finished_fraction"] = rollouts.finished.float().mean()
        metrics.update(step.metrics())
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()})
        self.log("barrier/mu", step.mu)
        if self.options.multipliers.ema:
            self.log_dict({f"constraints/{name}/value_ema": step.smoothed[i].float() for i, name in enumerate(step.names)})
        if step.value_loss is not None:
            self.log_dict({"train/value_baseline_mse": step.value_loss.detach(), "train/value_baseline_explained": step.value_explained})

    def maybe_log_samples(self, batch: dict[str, Any], rollouts: Rollouts, completions: list[str], max_rows: int = 4) -> None:
        every = self.options.evaluation.log_samples_every_n_steps
        if not every or self._trainer is None or self.global_step % every or not self.trainer.is_global_zero:
            return
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_text"):
            return
        rows = []
        for j in range(min(max_rows, len(rollouts.completion_ids))):
            prompt = batch["prompts"][int(rollouts.prompt_index[j])]
            rows.append(f"**prompt:** {prompt}\n\n**response ({len(rollouts.completion_ids[j])} tokens):** {completions[j]}")
        experiment.add_text("samples", "\n\n---\n\n".join(rows), global_step=self.global_step)

    # --- held-out evaluation --------------------------------------------------------------------
    def _eval_metric_keys(self) -> list[str]:
        keys = ["length", "response_length", "finished"] + [f"{c.name}__{kind}" for c in self.constraints for kind in ("cost", "reward")]
        return keys  # ModuleDict keys cannot contain '.' or '/'

    def _eval_step(self, batch: dict[str, Any]) -> None:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        self.val_ppl.update(logits[:, :-1].float(), batch["labels"][:, 1:])
        if not self.options.evaluation.generate:
            return
        k = self.options.evaluation.num_samples
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
        with attention_kernels(self.options.policy.cudnn_attention):
            self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with attention_kernels(self.options.policy.cudnn_attention):
            self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        with attention_kernels(self.options.policy.cudnn_attention):
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
        """FSDP2 under ``ModelParallelStrategy``: ``fully_shard`` each decoder layer, then the root (``sharding.shard_blocks``).

        A no-op under every other strategy (no device mesh). Decoder layers are the model's
        ``_no_split_modules`` classes (``LlamaDecoderLayer`` for the embedded model), so any Hugging
        Face causal LM is sharded per block. Forward hooks unshard parameters, so ``generate`` works.
        """
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_fully_sharded", False):
            return
        head = self.objective.value_head
        shard_blocks(self.model, mesh, extra=[head] if head is not None else [])
        self._fully_sharded = True

    def configure_optimizers(self) -> dict[str, Any]:
        # fp16 loss scaling: a fused step unscales the gradients itself, after clipping would have seen them scaled
        return self.build_optimizer(self.trainer.estimated_stepping_batches,
                                    fused=self.options.optimizer.fused and loss_scaler(self.trainer) is None)

    def build_optimizer(self, total_steps: int, fused: bool | None = None) -> dict[str, Any]:
        """AdamW (no decay on biases and norms; the value head at its own rate) and the warm-up-cosine schedule over ``total_steps``.

        ``fused``: torch's fused kernel (default: ``optimizer.fused``).
        """
        o = self.options.optimizer
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (no_decay if param.dim() < 2 else decay).append(param)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.objective.value_head is not None:
            groups.append({"params": list(self.objective.value_head.parameters()), "weight_decay": 0.0, "lr": self.options.value_baseline.lr})
        return adamw_warmup_cosine(groups, learning_rate=o.learning_rate, betas=o.betas, warmup_ratio=o.warmup_ratio,
                                   min_lr_ratio=o.min_lr_ratio, total_steps=total_steps, fused=o.fused if fused is None else fused)

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
        check_fit_outputs(self.trainer, self.options.export_dir, self.trainer.ckpt_path)
        self.warn_if_constraints_never_start()
        self.setup_constraints()
        if self.trainer.world_size > 1:
            # seed_everything gives every rank the same stream; sampling must differ across ranks or
            # their responses are correlated and more ranks do not reduce the estimator's variance
            # (on resume, ExactResume puts each rank's saved streams back after this, in on_train_start)
            torch.manual_seed((torch.initial_seed() + 1_000_003 * self.global_rank) % 2**63)

    def warn_if_constraints_never_start(self) -> None:
        """The warm-up outlasts ``trainer.max_steps``: the whole run would be plain SFT, though constraints are configured."""
        warmup, max_steps = self.options.barrier.warmup_steps, self.trainer.max_steps
        if self.constraints and warmup and max_steps is not None and 0 <= max_steps <= warmup:
            rank_zero_warn(f"model.barrier.warmup_steps={warmup} >= trainer.max_steps={max_steps}: the constraints never "
                           "switch on and this run is plain SFT; lower the warm-up or raise max_steps")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a resumed run does not re-run the packing check's forward passes (dropout draws)
        checkpoint["l3m"] = {**self.objective.training_state(), "packing_ok": self._packing_ok, "sharing_ok": self._sharing_ok,
                             "head_ok": self._head_ok}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_global_step = int(checkpoint.get("global_step", 0))
        state_dict = checkpoint.get("state_dict")
        if isinstance(state_dict, dict):  # before issue 13 the value head sat on the module itself
            for key in [k for k in state_dict if k.startswith(LEGACY_VALUE_HEAD)]:
                state_dict["objective." + key] = state_dict.pop(key)
        state = checkpoint.get("l3m")
        if state is None:
            return
        self.objective.load_training_state(state)
        if state.get("packing_ok") is not None:
            self._packing_ok = bool(state["packing_ok"])
        if state.get("sharing_ok") is not None:
            self._sharing_ok = bool(state["sharing_ok"])
        if state.get("head_ok") is not None:
            self._head_ok = bool(state["head_ok"])

    def on_fit_end(self) -> None:
        """Export the policy and tokenizer with ``save_pretrained`` so any Hugging Face tool loads them."""
        self.objective.at_end()
        target = self.export_path()
        if target is None:
            return
        state_dict = full_state_dict(self.model, self._trainer)  # collective under FSDP: every rank calls it
        if not self.trainer.is_global_zero:
            return
        model = self.model
        if self.options.policy.lora is not None and self.options.policy.merge_lora_on_export:
            model = copy.deepcopy(model).merge_and_unload()  # a plain model; training state untouched
        save_pretrained_atomically(target, model, self.tokenizer, marker=export_marker(self.trainer), state_dict=state_dict)

    def export_path(self) -> Path | None:
        return resolve_export_dir(self.options.export_dir, self.trainer)


#: State-dict prefix of the value head in checkpoints written before it moved into ``objective``.
LEGACY_VALUE_HEAD = "value_head."


def _detail(agreement: Any) -> str:
    """A check's numbers for its warning (the dtype, the largest difference, the tolerance); none for a pass that could not run."""
    return f" ({agreement})" if isinstance(agreement, Agreement) else ""


def loss_scaler(trainer: Any) -> Any:
    """The gradient scaler of the trainer's precision (fp16 mixed precision), or ``None`` (bf16, fp32, no trainer)."""
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def dataset_columns(batch: dict[str, Any]) -> dict[str, list[Any]]:
    """The batch's per-prompt dataset columns other than the prompt text (``references``: the reference responses), for constraints."""
    n = len(batch["prompts"])
    return {k: v for k, v in batch.items() if k != "prompts" and isinstance(v, list) and len(v) == n}
