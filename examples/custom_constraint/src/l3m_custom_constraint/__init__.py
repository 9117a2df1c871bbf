"""Example l3m-lightning constraint plugin: one Constraint subclass and one plain reward function.

Both are declared in this package's ``pyproject.toml`` under the entry-point group
``l3m_lightning.constraints``, so once the package is installed a config can use them by name::

    constraints:
      - name: no_digits          # the Constraint subclass
        threshold: 0.05          # at most 5% of characters are digits
        sense: at_most
      - name: politeness         # the reward function, wrapped in a RewardFunctionConstraint
        threshold: 0.5
        sense: at_least
        scale: 0.5
        kwargs: {words: [please, thank]}
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from constraints import Constraint


class NoDigits(Constraint):
    """Fraction of a response's characters that are digits; use with ``sense: at_most``."""

    registry_name = "no_digits"
    default_scale = 0.1  # a fraction: 0.1 is a sensible unit

    def score(self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], **columns: Any) -> torch.Tensor:
        return torch.tensor([sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions], dtype=torch.float64)


def politeness(prompts: list[str], completions: list[str], completion_ids: Any, words: Sequence[str] = ("please", "thank"), **kwargs: Any) -> list[float | None]:
    """1.0 if the response contains one of ``words`` (case-insensitive), else 0.0; empty responses are dropped (None)."""
    rewards: list[float | None] = []
    for text in completions:
        lowered = text.lower()
        rewards.append(None if not lowered.strip() else float(any(w in lowered for w in words)))
    return rewards
