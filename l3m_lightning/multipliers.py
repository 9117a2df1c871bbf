"""How each constraint's multiplier λ_i is set from its estimate Ĉ_i: three methods, one interface.

* ``barrier`` (L3M, default): λ_i = B'_μ(Ĉ_i)/k, read off the relaxed log-barrier (method.md §3).
* ``lagrangian`` (the paper's "MM" baseline): learned multipliers, projected gradient ascent
  λ_i ← max(0, λ_i + η_λ·Ĉ_i) every step.
* ``penalty``: fixed hand-set weights w_i — the heuristic the paper argues against.

All three feed the same surrogate loss, so methods compare on the same sampling, data and budget.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from l3m_lightning.estimator import constraint_multipliers
from l3m_lightning.options import METHODS


class MultiplierRule:
    def __init__(
        self,
        method: str = "barrier",
        num_constraints: int = 0,
        dual_lr: float = 0.1,
        dual_init: float | Sequence[float] = 0.0,
        penalty_weights: Sequence[float] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"model.multipliers.method must be one of {', '.join(METHODS)}, got {method!r}")
        if method == "lagrangian" and not dual_lr > 0:
            raise ValueError(f"model.multipliers.dual_lr must be > 0 for method 'lagrangian', got {dual_lr}")
        self.method, self.dual_lr = method, float(dual_lr)
        self.lambdas = _per_constraint(dual_init, num_constraints, "model.multipliers.dual_init")
        if (self.lambdas < 0).any():
            raise ValueError(f"model.multipliers.dual_init must be >= 0, got {dual_init}")
        if method == "penalty":
            if penalty_weights is None:
                raise ValueError("model.multipliers.penalty_weights is required for method 'penalty' (one weight per constraint)")
            self.lambdas = _per_constraint(penalty_weights, num_constraints, "model.multipliers.penalty_weights")

    def __call__(self, estimates: torch.Tensor, mu: float) -> torch.Tensor:
        """λ for this step (detached, on ``estimates``' device)."""
        if self.method == "barrier":
            return constraint_multipliers(estimates, mu)
        if self.method == "lagrangian":
            self.lambdas = (self.lambdas + self.dual_lr * estimates.detach().cpu().to(self.lambdas)).clamp(min=0.0)
        return self.lambdas.to(estimates)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "lambdas": self.lambdas.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.method:
            raise ValueError(f"checkpoint was trained with method {state['method']!r}, this run uses {self.method!r}")
        self.lambdas = state["lambdas"].to(torch.float64)


def _per_constraint(value: float | Sequence[float], k: int, field: str) -> torch.Tensor:
    values = [float(value)] * k if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != k:
        raise ValueError(f"{field} needs one value per constraint ({k}), got {len(values)}")
    return torch.tensor(values, dtype=torch.float64)
