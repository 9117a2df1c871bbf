"""Diagnostics: say so, once, when a run quietly does less than it seems to.

A constraint whose estimate stays in the barrier's linear region (Ĉ > −μ²) for a long stretch is
probably infeasible at that threshold (or its scale is off); one whose multiplier has stayed tiny
throughout never shaped training, so its threshold is looser than what the task gives anyway.
``option_warnings`` lists settings that are accepted but degrade the method (one sample per prompt,
a length threshold ``max_new_tokens`` decides, biased sampling, options that have no effect);
``TruncationMonitor`` notices when most sampled responses are cut at ``max_new_tokens``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

from lightning.pytorch.utilities import rank_zero_warn


class FeasibilityMonitor:
    def __init__(self, names: list[str], patience: int = 200, inactive_lambda: float = 1e-3) -> None:
        self.names, self.patience, self.inactive_lambda = names, patience, inactive_lambda
        self.linear_streak = [0] * len(names)
        self.max_lambda = [0.0] * len(names)
        self.warned: set[tuple[str, str]] = set()

    def update(self, estimates: list[float], multipliers: list[float], mu: float) -> list[str]:
        """Record one step; returns (and warns) the messages raised for the first time."""
        messages = []
        for i, name in enumerate(self.names):
            self.linear_streak[i] = self.linear_streak[i] + 1 if estimates[i] > -mu * mu else 0
            self.max_lambda[i] = max(self.max_lambda[i], multipliers[i])
            if self.patience and self.linear_streak[i] >= self.patience:
                messages += self._once(name, "infeasible", (
                    f"constraint '{name}': its estimate has stayed in the barrier's linear region (C > -mu^2) for "
                    f"{self.linear_streak[i]} steps — the threshold may be infeasible, or its scale too small"))
        return messages

    def at_end(self) -> list[str]:
        messages = []
        for i, name in enumerate(self.names):
            if self.max_lambda[i] < self.inactive_lambda:
                messages += self._once(name, "inactive", (
                    f"constraint '{name}': its multiplier never exceeded {self.inactive_lambda:g} — it never shaped "
                    f"training; the threshold may be looser than the model's behaviour anyway"))
        return messages

    def _once(self, name: str, kind: str, message: str) -> list[str]:
        if (name, kind) in self.warned:
            return []
        self.warned.add((name, kind))
        rank_zero_warn(message)
        return [message]

    def state_dict(self) -> dict:
        return {"linear_streak": self.linear_streak, "max_lambda": self.max_lambda, "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.linear_streak, self.max_lambda = list(state["linear_streak"]), list(state["max_lambda"])
        self.warned = {tuple(w) for w in state["warned"]}


def option_warnings(
    constraints: Sequence[Any],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    value_baseline: bool = False,
    method: str = "barrier",
    penalty_weights: Sequence[float] | None = None,
    dual_init: float | Sequence[float] = 0.0,
    constraint_warmup_steps: int = 0,
    constraint_ema: float = 0.0,
) -> list[str]:
    """One line for each setting that is valid but quietly weakens or disables part of the method."""
    from constraints.length import LengthConstraint

    out = []
    if constraints and num_samples == 1:
        out.append("model.sampling.num_samples=1: no leave-one-out baseline (one sample per prompt); each sample's baseline is "
                   "the mean cost of the other samples in the batch, a noisier constraint gradient; use model.sampling.num_samples >= 2")
    for c in constraints:
        if not isinstance(c, LengthConstraint):
            continue
        if c.sense == "at_least" and c.threshold >= max_new_tokens:
            out.append(f"constraint '{c.name}' (length >= {c.threshold:g}) can never hold with room to spare: responses are cut at "
                       f"model.sampling.max_new_tokens={max_new_tokens}; raise model.sampling.max_new_tokens well above the threshold")
        elif c.sense == "at_most" and c.threshold >= max_new_tokens:
            out.append(f"constraint '{c.name}' (length <= {c.threshold:g}) always holds: no response is longer than "
                       f"model.sampling.max_new_tokens={max_new_tokens}, so it cannot shape training; raise model.sampling.max_new_tokens above the threshold")
    if constraints and (temperature != 1.0 or top_k or top_p < 1.0):
        out.append(f"model.sampling.temperature={temperature:g}, model.sampling.top_k={top_k}, model.sampling.top_p={top_p:g}: responses are not sampled from "
                   "the policy itself, so the constraint gradient is biased; keep temperature 1.0, top_k 0, top_p 1.0")
    if not constraints:
        unused = [key for key, on in (("model.value_baseline.enabled", value_baseline), ("model.barrier.warmup_steps", constraint_warmup_steps > 0),
                                      ("model.multipliers.penalty_weights", penalty_weights is not None)) if on]
        if unused:
            out.append(f"{', '.join(unused)}: no effect without model.constraints (this run is plain SFT)")
    else:
        if penalty_weights is not None and method != "penalty":
            out.append(f"model.multipliers.penalty_weights is ignored with model.multipliers.method: {method} (it is used by method: penalty only)")
        if method != "lagrangian" and any(float(v) != 0.0 for v in (dual_init if isinstance(dual_init, (list, tuple)) else [dual_init])):
            out.append(f"model.multipliers.dual_init is ignored with model.multipliers.method: {method} (it is used by method: lagrangian only)")
        if method == "penalty" and constraint_ema:
            out.append("model.multipliers.ema has no effect with model.multipliers.method: penalty (fixed weights do not read the estimate)")
    return out


def warn_all(messages: list[str]) -> list[str]:
    for message in messages:
        rank_zero_warn(message)
    return messages


class TruncationMonitor:
    """Warn once when more than ``threshold`` of the sampled responses hit ``max_new_tokens`` in each of ``window`` steps in a row.

    A response cut at the limit is scored as it is: constraints are then measured on truncated
    responses (a length constraint sees ``max_new_tokens``, a reward model half an answer). Every
    step of the window must be over the threshold, not just their mean: a policy trained from random
    init rambles to the limit for its first few dozen steps and then learns to stop (the quickstart:
    ~95% of responses cut at step 0, ~5% by step 20), which is not worth a warning.
    Not checkpointed: a resumed run may warn again.
    """

    def __init__(self, max_new_tokens: int, window: int = 50, threshold: float = 0.5) -> None:
        self.max_new_tokens, self.threshold = max_new_tokens, threshold
        self.fractions: deque[float] = deque(maxlen=window)
        self.warned = False

    def update(self, truncated_fraction: float) -> list[str]:
        """Record one step's share of responses that ended at the limit; returns (and warns) the message the first time."""
        self.fractions.append(float(truncated_fraction))
        if self.warned or len(self.fractions) < self.fractions.maxlen or min(self.fractions) <= self.threshold:
            return []
        self.warned = True
        share = sum(self.fractions) / len(self.fractions)
        return warn_all([f"model.sampling.max_new_tokens={self.max_new_tokens}: more than {self.threshold:.0%} of the sampled responses were cut "
                         f"at it without a stop token in each of the last {len(self.fractions)} steps ({share:.0%} on average), so the "
                         f"constraints are measured on truncated responses; raise model.sampling.max_new_tokens"])


class NoValidSamplesMonitor:
    """Warn once per constraint when a step has no valid sample for it (all dropped): its estimate is then read as 0."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.warned = names, set()

    def update(self, valid_counts: Sequence[int], step: int) -> list[str]:
        messages = []
        for name, count in zip(self.names, valid_counts):
            if count == 0 and name not in self.warned:
                self.warned.add(name)
                messages.append(f"constraint '{name}': no valid sample at step {step} (every score was dropped, on_invalid: drop); "
                                "its estimate is taken as 0 (satisfied) for that step")
        return warn_all(messages)
