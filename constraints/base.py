"""The constraint interface: a reward r(x, y), a threshold b, a sense and a scale.

A constraint turns rewards into normalised costs ``c = (r − b)/scale`` ("at_most") or
``c = (b − r)/scale`` ("at_least"), so ``E[c] ≤ 0`` is the requirement and c is O(1): the
barrier is not scale-free (method.md §1), so the scale is the threshold's unit, not optional.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Literal, Mapping, Sequence

import torch

Sense = Literal["at_most", "at_least"]


class ConstraintError(ValueError):
    """A constraint's scorer failed or returned something unusable; the message names the constraint.

    A ``ValueError`` subclass, so callers that caught the earlier ``ValueError`` keep working.
    """


class ConfigError(ValueError):
    """A mistake the user fixes in the config, the data or the folders it names, not a bug in the code.

    Raised by our own checks (a missing file, a malformed data row, a folder that cannot be
    written, a model that needs custom code); the command line prints its message as one line and
    exits with status 2 (``l3m_lightning.errors``). A ``ValueError``, so ``except ValueError`` still
    catches it. It lives here, in the bottom layer, because constraints and model loading raise it too.
    """


class ConstraintConfigError(ConstraintError, ConfigError):
    """A constraint that cannot start (its reward model will not load): both a ``ConstraintError`` and a ``ConfigError``."""


SENSES = ("at_most", "at_least")


class Constraint:
    """Base class. Subclasses implement :meth:`score`; ``setup``/``state_dict`` are optional hooks.

    ``default_scale`` lets a subclass whose rewards are already O(1) (a standardised reward model)
    provide a scale; otherwise ``scale`` must be given, in the threshold's units.
    """

    #: Short name used in logs (``constraints/<name>/...``) and in the registry.
    registry_name: str = "constraint"
    default_scale: float | None = None

    def __init__(
        self,
        threshold: float,
        sense: Sense = "at_most",
        scale: float | None = None,
        name: str | None = None,
        on_invalid: Literal["error", "drop"] = "error",
    ) -> None:
        self.name = name or self.registry_name
        where = f"constraint '{self.name}'"
        if sense not in SENSES:
            raise ValueError(f"{where}: sense must be 'at_most' or 'at_least', got {sense!r}")
        if not _is_finite_number(threshold):
            raise ValueError(f"{where}: threshold must be a finite number, got {threshold!r}")
        scale = self.default_scale if scale is None else scale
        if scale is None:
            raise ValueError(
                f"{where}: scale is required — the threshold's unit, so that (reward - threshold)/scale is O(1) "
                f"(e.g. scale: 100 for a length in tokens)"
            )
        if not _is_finite_number(scale) or scale <= 0:
            raise ValueError(f"{where}: scale must be a finite number > 0, got {scale!r}")
        if on_invalid not in ("error", "drop"):
            raise ValueError(f"{where}: on_invalid must be 'error' or 'drop', got {on_invalid!r}")
        self.threshold, self.sense, self.scale, self.on_invalid = float(threshold), sense, float(scale), on_invalid

    # --- to implement -------------------------------------------------------------------------
    def score(
        self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], **columns: Any
    ) -> torch.Tensor | Sequence[float | None]:
        """Raw rewards r(x, y), one per completion, in the threshold's units. ``None`` drops a sample.

        ``prompts``, ``completions`` and ``completion_ids`` (the response tokens, without the stop
        token) are aligned, one entry per sampled response. ``columns`` are the dataset's columns for
        each response's prompt, aligned the same way; the training and evaluation steps pass
        ``references``: the data's reference response text. A subclass may name the columns it
        uses (``def score(self, prompts, completions, completion_ids, references, **columns)``); one
        that takes no ``**columns`` gets only the columns its signature names.
        """
        raise NotImplementedError

    def setup(self, device: torch.device) -> None:
        """Move any model the constraint holds to ``device`` (called once before training)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # --- used by the training step --------------------------------------------------------------
    def cost(self, rewards: torch.Tensor) -> torch.Tensor:
        """Normalised constraint values c (≤ 0 means satisfied)."""
        diff = rewards - self.threshold if self.sense == "at_most" else self.threshold - rewards
        return diff / self.scale

    def evaluate(
        self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], **columns: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score and validate: returns float64 ``rewards`` and a bool ``valid`` mask, both ``[N]``.

        A wrong number of scores always fails; NaN/inf fails naming the sample, or is dropped
        when ``on_invalid='drop'``; ``None`` is always a deliberate drop.
        """
        n = len(completions)
        try:
            raw = self.score(prompts, completions, completion_ids, **accepted_columns(self.score, columns))
        except (ConstraintError, torch.cuda.OutOfMemoryError):
            raise  # already names the constraint / callers may catch OOM by type
        except Exception as err:
            raise ConstraintError(f"constraint '{self.name}': score() raised {type(err).__name__}: {err}") from err
        if raw is None:
            raise ConstraintError(f"constraint '{self.name}': score() returned None instead of one reward per completion")
        if isinstance(raw, torch.Tensor):
            rewards = raw.detach().to(torch.float64).flatten().cpu()
            given = torch.ones_like(rewards, dtype=torch.bool)
        else:
            raw = list(raw)
            given = torch.tensor([r is not None for r in raw], dtype=torch.bool)
            rewards = torch.tensor([float("nan") if r is None else self._as_float(r, i, completions) for i, r in enumerate(raw)], dtype=torch.float64)
        if rewards.numel() != n:
            raise ConstraintError(f"constraint '{self.name}': score() returned {rewards.numel()} values for {n} completions")
        bad = given & ~torch.isfinite(rewards)
        if bad.any() and self.on_invalid == "error":
            i = int(bad.nonzero()[0])
            raise ConstraintError(
                f"constraint '{self.name}': score() returned {rewards[i].item()} for sample {i} "
                f"(completion {completions[i][:80]!r}); set on_invalid: drop to skip such samples"
            )
        valid = given & ~bad
        return torch.where(valid, rewards, torch.zeros_like(rewards)), valid

    def _as_float(self, value: Any, index: int, completions: Sequence[str]) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            where = f"completion {completions[index][:80]!r}" if index < len(completions) else "beyond the last completion"
            raise ConstraintError(
                f"constraint '{self.name}': score() returned {value!r:.80} for sample {index} ({where}); expected a number or None"
            ) from None

    def __repr__(self) -> str:
        op = "<=" if self.sense == "at_most" else ">="
        return f"{type(self).__name__}({self.name} {op} {self.threshold:g}, scale={self.scale:g})"


def accepted_columns(function: Callable[..., Any], columns: Mapping[str, Any]) -> dict[str, Any]:
    """The ``columns`` that ``function`` accepts: all of them when it takes ``**kwargs``, else those it names."""
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): pass everything
        return dict(columns)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(columns)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in columns.items() if k in names}


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
