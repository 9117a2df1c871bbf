"""The relaxed log-barrier of L3Ms (method.md §2) and its μ schedule.

The classic barrier ``-μ log(-z)`` is undefined for violated constraints (z > 0), and a fresh
model usually violates them. The relaxed barrier continues it linearly beyond ``z = -μ²``, so it
is finite everywhere, convex, increasing and C¹, and tends to the indicator of ``{z ≤ 0}`` as
μ → 0. Its derivative divided by the number of constraints is the Lagrange multiplier estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Tensorish = torch.Tensor | float


def _as_tensor(z: Tensorish) -> torch.Tensor:
    if isinstance(z, torch.Tensor):
        # integer/bool tensors are promoted like Python numbers: ``full_like(z, 1/μ)`` would truncate 1/μ
        return z if z.is_floating_point() else z.to(torch.float64)
    return torch.tensor(float(z), dtype=torch.float64)


def relaxed_log_barrier(z: Tensorish, mu: float) -> torch.Tensor:
    """B_μ(z): ``-μ log(-z)`` for ``z ≤ -μ²``, else ``z/μ - μ log(μ²) + μ``.

    The log is evaluated on ``max(-z, μ²)`` so neither branch can produce NaN or inf, for any z
    (``torch.where`` evaluates both branches, and their gradients).
    """
    _check_mu(mu)
    z = _as_tensor(z)
    s = mu * mu
    log_branch = -mu * torch.log(torch.clamp(-z, min=s))
    linear_branch = z / mu - mu * math.log(s) + mu
    return torch.where(z <= -s, log_branch, linear_branch)


def relaxed_log_barrier_grad(z: Tensorish, mu: float) -> torch.Tensor:
    """B'_μ(z): ``μ / (-z)`` for ``z ≤ -μ²``, else ``1/μ``. Always in ``(0, 1/μ]``."""
    _check_mu(mu)
    z = _as_tensor(z)
    s = mu * mu
    return torch.where(z <= -s, mu / torch.clamp(-z, min=s), torch.full_like(z, 1.0 / mu))


def _check_mu(mu: float) -> None:
    if not (isinstance(mu, (int, float)) and math.isfinite(mu) and mu > 0):
        raise ValueError(f"barrier mu must be a finite number > 0, got {mu!r}")


@dataclass
class MuSchedule:
    """Exponential decay of the barrier parameter: ``μ ← max(floor, γ·μ)`` every ``every`` steps.

    μ starts large so the model first learns the task with gently enforced constraints, then
    decays, nudging it towards feasibility (method.md §3). The paper does not publish the numbers;
    the defaults are ours: 1.0 down to 0.01 (the range of the paper's Figure 1).

    The schedule is training state: ``state_dict``/``load_state_dict`` carry μ and the step count
    through checkpoints so a resumed run continues with the same μ.
    """

    start: float = 1.0
    floor: float = 0.01
    factor: float = 0.9
    every: int = 10

    def __post_init__(self) -> None:
        _check_mu(self.start)
        _check_mu(self.floor)
        if self.floor > self.start:
            raise ValueError(f"mu_schedule.floor ({self.floor}) must be <= mu_schedule.start ({self.start})")
        if not 0 < self.factor <= 1:
            raise ValueError(f"mu_schedule.factor must be in (0, 1], got {self.factor}")
        if int(self.every) < 1:
            raise ValueError(f"mu_schedule.every must be a positive number of steps, got {self.every}")
        self.mu = float(self.start)
        self.steps = 0

    def step(self) -> float:
        """Advance by one optimiser step; decay μ when ``every`` steps have passed."""
        self.steps += 1
        if self.steps % int(self.every) == 0:
            self.mu = max(self.floor, self.mu * self.factor)
        return self.mu

    def state_dict(self) -> dict[str, float | int]:
        return {"mu": self.mu, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.mu = float(state["mu"])
        self.steps = int(state["steps"])
