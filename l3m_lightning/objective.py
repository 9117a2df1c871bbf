"""The constrained part of the L3M objective as one unit: constraints → costs → Ĉ → λ → surrogate loss.

``ConstrainedObjective`` owns everything between the sampled responses and the loss term they add
(method.md §3–5): the constraints, the μ schedule, the optional EMA of Ĉ, the multiplier rule
(barrier, Lagrangian or penalty), the optional per-token value head, and the monitors that warn
when a run quietly does less than it seems (feasibility, truncation, no valid sample). Given one
batch's prompts, the sampled responses and their tokens' log-probs, ``step`` returns an
``ObjectiveStep``: the rewards, costs and validity masks, the estimates and multipliers, and the
surrogate whose gradient is Σ_i λ_i ∇C_i (plus the value head's regression loss).

Its training state other than parameters (μ and its step count, the EMA, the Lagrangian's λ, the
monitors, each constraint's own state) is ``training_state`` / ``load_training_state``: the module
writes it to ``checkpoint["l3m"]``. The value head's parameters are ordinary module parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from constraints import Constraint
from l3m_lightning.barrier import MuSchedule
from l3m_lightning.diagnostics import FeasibilityMonitor, NoValidSamplesMonitor, TruncationMonitor
from l3m_lightning.estimator import ExponentialMovingAverage, masked_mean, policy_gradient_surrogate, token_level_surrogate
from l3m_lightning.logprobs import TokenLogprobs
from l3m_lightning.multipliers import MultiplierRule
from l3m_lightning.options import BarrierArgs, MultiplierArgs, ValueBaselineArgs
from l3m_lightning.sampling import Rollouts
from l3m_lightning.value_baseline import TokenValueHead

#: Sums over ranks (``strategy.reduce(x, reduce_op="sum")``); the identity on one process.
ReduceSum = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ObjectiveStep:
    """One training step's constraint quantities; tensors ``[k, N]`` are per constraint and sampled response."""

    names: list[str]  # the constraints' names, in order
    rewards: torch.Tensor  # [k, N] float64 raw rewards (0 where invalid)
    costs: torch.Tensor  # [k, N] normalised costs c = ±(r − b)/scale
    valid: torch.Tensor  # [k, N] bool
    valid_counts: torch.Tensor  # [k] valid samples over all ranks
    estimates: torch.Tensor  # [k] Ĉ_i, the mean cost over all ranks' valid samples
    smoothed: torch.Tensor  # [k] Ĉ_i after the optional EMA (= estimates when it is off)
    multipliers: torch.Tensor  # [k] λ_i
    mu: float  # the barrier's μ this step
    surrogate: torch.Tensor  # scalar: its gradient is Σ_i λ_i ∇C_i (its value means nothing)
    value_loss: torch.Tensor | None = None  # the value head's regression loss (with value_baseline)
    value_explained: torch.Tensor | None = None  # 1 − MSE/Var(cost) of the value head

    @property
    def loss(self) -> torch.Tensor:
        """What the step adds to the SFT loss."""
        return self.surrogate if self.value_loss is None else self.surrogate + self.value_loss

    def metrics(self) -> dict[str, torch.Tensor]:
        """``constraints/<name>/{value,reward,lambda,satisfied,valid_fraction}`` (TensorBoard keys)."""
        out: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.names):
            prefix = f"constraints/{name}"
            out[f"{prefix}/value"] = self.estimates[i]
            out[f"{prefix}/reward"] = masked_mean(self.rewards[i], self.valid[i])
            out[f"{prefix}/lambda"] = self.multipliers[i]
            out[f"{prefix}/satisfied"] = (self.estimates[i] <= 0).float()
            out[f"{prefix}/valid_fraction"] = self.valid[i].float().mean()
        return out


class ConstrainedObjective(torch.nn.Module):
    """Constraints, μ schedule, multiplier rule, value head and monitors; ``step`` turns samples into a loss term.

    Args:
        constraints: the built constraints (empty: plain SFT, ``step`` is never called).
        barrier / multipliers / value_baseline: the option groups (``l3m_lightning.options``).
        max_new_tokens: the sampling bound (truncation monitor; the value head's position feature).
        hidden_size: the policy's hidden size (the value head reads its last hidden state).
    """

    def __init__(
        self,
        constraints: Sequence[Constraint],
        barrier: BarrierArgs,
        multipliers: MultiplierArgs,
        value_baseline: ValueBaselineArgs,
        max_new_tokens: int,
        hidden_size: int,
    ) -> None:
        super().__init__()
        self.constraints: list[Constraint] = list(constraints)
        self.barrier, self.multiplier_args, self.value_baseline = barrier, multipliers, value_baseline
        names = self.names
        self.mu_schedule = MuSchedule(start=barrier.mu_start, floor=barrier.mu_floor, factor=barrier.mu_decay, every=barrier.mu_decay_every)
        self.ema = ExponentialMovingAverage(multipliers.ema)
        self.multiplier_rule = MultiplierRule(multipliers.method, len(names), multipliers.dual_lr, multipliers.dual_init, multipliers.penalty_weights)
        self.feasibility = FeasibilityMonitor(names, patience=barrier.infeasibility_patience)
        self.truncation = TruncationMonitor(max_new_tokens)
        self.no_valid_samples = NoValidSamplesMonitor(names)
        # optional learned per-token baseline (value_baseline.py); its parameters train alongside the policy's
        self.value_head = (TokenValueHead(hidden_size, len(names), max_new_tokens, value_baseline.width)
                           if value_baseline.enabled and names else None)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.constraints]

    @property
    def mu(self) -> float:
        return self.mu_schedule.mu

    def active(self, global_step: int) -> bool:
        """The constraints shape this step: there are some, and ``barrier.warmup_steps`` have passed."""
        return bool(self.constraints) and global_step >= self.barrier.warmup_steps

    def after_optimizer_step(self) -> None:
        """μ decays per optimiser step (call only while ``active``: its schedule starts after the warm-up)."""
        self.mu_schedule.step()

    # --- the step ------------------------------------------------------------------------------
    def score(
        self, prompts: Sequence[str], completions: Sequence[str], rollouts: Rollouts, columns: Mapping[str, Sequence[Any]] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rewards, normalised costs and validity masks, each ``[k, N]`` (float64 / bool, on the rollouts' device).

        ``prompts`` and each of ``columns`` (e.g. ``references``) have one entry per *prompt*; each
        sample gets its prompt's, and the constraints see them as ``score(..., **columns)``.
        """
        index = rollouts.prompt_index.tolist()
        per_sample = [prompts[i] for i in index]
        cols = {name: [values[i] for i in index] for name, values in (columns or {}).items()}
        rewards, valid = zip(*(c.evaluate(per_sample, completions, rollouts.completion_ids, **cols) for c in self.constraints))
        device = rollouts.input_ids.device
        rewards_t = torch.stack(rewards).to(device)
        costs = torch.stack([c.cost(r) for c, r in zip(self.constraints, rewards_t)])
        return rewards_t, costs, torch.stack(valid).to(device)

    @staticmethod
    def estimate(costs: torch.Tensor, valid: torch.Tensor, reduce_sum: ReduceSum | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ĉ_i, the mean over the valid samples of *all* ranks (so every rank gets the same λ), and those counts."""
        sums = torch.stack([torch.where(valid, costs, 0.0).sum(dim=1), valid.sum(dim=1).to(costs.dtype)])
        sums = reduce_sum(sums) if reduce_sum is not None else sums
        return sums[0] / sums[1].clamp(min=1), sums[1]

    def surrogate(
        self, logprobs: TokenLogprobs, costs: torch.Tensor, valid: torch.Tensor, multipliers: torch.Tensor, group_size: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Σ_i λ_i · (policy-gradient estimate of C_i), the value head's loss and its explained variance (or None).

        The leave-one-out baseline, plus V's per-token shift with ``value_baseline.enabled``.
        """
        costs, multipliers = costs.to(logprobs.logp), multipliers.to(logprobs.logp)
        if self.value_head is None:
            return policy_gradient_surrogate(logprobs.sums(), costs, multipliers, group_size, valid), None, None
        values = self.value_head(logprobs)
        value_loss = self.value_head.loss(values, logprobs, costs, valid)
        explained = self.value_head.explained_variance(value_loss, logprobs, costs, valid)
        shift = self.value_head.baseline_shift(values, logprobs)
        surrogate = token_level_surrogate(logprobs.logp, logprobs.sequence, shift, costs, multipliers, group_size, valid,
                                          token_position=logprobs.positions(), gae_lambda=self.value_baseline.gae_lambda)
        return surrogate, value_loss, explained

    def step(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        rollouts: Rollouts,
        logprobs: TokenLogprobs,
        columns: Mapping[str, Sequence[Any]] | None = None,
        reduce_sum: ReduceSum | None = None,
        global_step: int = 0,
    ) -> ObjectiveStep:
        """Score the samples, read λ off the (all-reduced, optionally smoothed) estimates, build the surrogate, update the monitors.

        ``completions``: the decoded responses, one per sample; ``logprobs``: log π of every sampled
        token (with the last hidden states when there is a value head).
        """
        rewards, costs, valid = self.score(prompts, completions, rollouts, columns)
        estimates, counts = self.estimate(costs, valid, reduce_sum)
        smoothed = self.ema.update(estimates)  # = estimates unless multipliers.ema > 0
        mu = self.mu_schedule.mu
        multipliers = self.multiplier_rule(smoothed, mu)
        surrogate, value_loss, explained = self.surrogate(logprobs, costs, valid, multipliers, rollouts.group_size)
        # the barrier's linear region is Ĉ > −μ²; for the baselines, plain violation Ĉ > 0
        region_mu = mu if self.multiplier_args.method == "barrier" else 0.0
        # the monitors read host numbers: one device→host copy for all of them, not one sync each
        k = len(self.constraints)
        truncated = 1.0 - rollouts.finished.float().mean()
        host = torch.cat([estimates, multipliers.to(estimates), counts.to(estimates), truncated.to(estimates).view(1)]).tolist()
        self.feasibility.update(host[:k], host[k:2 * k], region_mu)
        self.no_valid_samples.update(host[2 * k:3 * k], global_step)
        self.truncation.update(host[3 * k])
        return ObjectiveStep(self.names, rewards, costs, valid, counts, estimates, smoothed, multipliers, mu, surrogate, value_loss, explained)

    def idle_loss(self) -> torch.Tensor | None:
        """A zero term that keeps the value head in the graph on steps without samples (warm-up), as DDP/FSDP expect."""
        return None if self.value_head is None else 0.0 * self.value_head().sum()

    def at_end(self) -> None:
        """End of fit: name the constraints that never shaped training (the barrier only)."""
        if self.constraints and self.multiplier_args.method == "barrier":
            self.feasibility.at_end()

    # --- state ---------------------------------------------------------------------------------
    def training_state(self) -> dict[str, Any]:
        """Everything but parameters that a resumed run needs (``checkpoint["l3m"]``; the layout predates this class)."""
        return {
            "mu_schedule": self.mu_schedule.state_dict(),
            "constraint_ema": self.ema.state_dict(),
            "multipliers": self.multiplier_rule.state_dict(),
            "feasibility": self.feasibility.state_dict(),
            "constraints": {c.name: c.state_dict() for c in self.constraints},
        }

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of ``training_state``; older checkpoints may lack the multipliers and feasibility entries."""
        self.mu_schedule.load_state_dict(state["mu_schedule"])
        self.ema.load_state_dict(state["constraint_ema"])
        if "multipliers" in state:
            self.multiplier_rule.load_state_dict(state["multipliers"])
        if "feasibility" in state:
            self.feasibility.load_state_dict(state["feasibility"])
        for c in self.constraints:
            if c.name in state.get("constraints", {}):
                c.load_state_dict(state["constraints"][c.name])
