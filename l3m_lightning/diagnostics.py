"""Feasibility diagnostics: say so, once, when a threshold looks infeasible or never binds.

A constraint whose estimate stays in the barrier's linear region (Ĉ > −μ²) for a long stretch is
probably infeasible at that threshold (or its scale is off); one whose multiplier has stayed tiny
throughout never shaped training, so its threshold is looser than what the task gives anyway.
"""

from __future__ import annotations

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
