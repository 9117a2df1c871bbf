"""Response length in tokens of the policy's tokenizer (EOS not counted)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from constraints.base import Constraint


class LengthConstraint(Constraint):
    """Mean response length "at_most" / "at_least" ``threshold`` tokens.

    A response cut off at ``max_new_tokens`` counts as that many tokens, so an "at_least"
    threshold above ``max_new_tokens`` can never be met: keep it well inside.
    """

    registry_name = "length"

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], **columns: Any
    ) -> torch.Tensor:
        return torch.tensor([float(len(ids)) for ids in completion_ids], dtype=torch.float64)
