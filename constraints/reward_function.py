"""Any reward function ``fn(prompts, completions, completion_ids, **kwargs) -> list[float | None]`` as a constraint.

This is the signature reward functions commonly share across RL fine-tuning libraries, so existing
ones plug in unchanged::

    constraints:
      - name: reward_function
        function: my_pkg.rewards.politeness   # dotted path (or "my_pkg.rewards:politeness")
        kwargs: {min_words: 3}                # extra keyword arguments for every call (optional)
        threshold: 0.5
        sense: at_least
        scale: 0.5

``None`` drops that sample from this constraint's estimate (and its sample count); NaN/inf and a
wrong number of rewards fail the step naming the constraint and the sample (see ``Constraint.evaluate``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Literal, Sequence

import torch

from constraints.base import Constraint, ConstraintError, Sense

RewardFunction = Callable[..., Sequence[float | None] | torch.Tensor]


class RewardFunctionConstraint(Constraint):
    """Wrap a reward function as a constraint.

    Args:
        function: the callable, or its import path ``"pkg.module.fn"`` / ``"pkg.module:fn"``.
            Called as ``function(prompts, completions, completion_ids, **columns, **kwargs)``.
        threshold / sense / scale: the requirement on the mean reward, in the reward's units
            (``scale`` is required: it is the threshold's unit, see ``Constraint``).
        name: defaults to the function's ``__name__`` (so two reward functions get distinct names).
        kwargs: extra keyword arguments passed on every call.
        on_invalid: ``"error"`` (default) or ``"drop"`` for NaN/inf rewards.
    """

    registry_name = "reward_function"
    #: Set on the subclasses made for reward functions registered by name or entry point.
    default_function: RewardFunction | None = None

    def __init__(
        self,
        function: str | RewardFunction | None = None,
        threshold: float | None = None,
        sense: Sense = "at_most",
        scale: float | None = None,
        name: str | None = None,
        kwargs: dict[str, Any] | None = None,
        on_invalid: Literal["error", "drop"] = "error",
    ) -> None:
        if function is None:
            function = type(self).default_function
        where = f"constraint '{name or self.registry_name}'"
        if function is None:
            raise ValueError(f"{where}: 'function' is required — a callable or an import path like 'my_pkg.rewards.my_fn'")
        self.function = resolve_function(function, where)
        self.function_path = function if isinstance(function, str) else _qualified_name(self.function)
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"{where}: 'kwargs' must be a mapping of extra keyword arguments, got {kwargs!r:.80}")
        self.kwargs = dict(kwargs or {})
        default_name = getattr(self.function, "__name__", None) if type(self).default_function is None else self.registry_name
        super().__init__(threshold, sense=sense, scale=scale, name=name or default_name, on_invalid=on_invalid)

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]], **columns: Any
    ) -> Sequence[float | None] | torch.Tensor:
        try:
            return self.function(list(prompts), list(completions), completion_ids, **columns, **self.kwargs)
        except Exception as err:
            raise ConstraintError(
                f"constraint '{self.name}': reward function {self.function_path} raised {type(err).__name__}: {err}"
            ) from err

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, function={self.function_path})"


def resolve_function(function: str | RewardFunction, where: str = "reward function") -> RewardFunction:
    """A callable, or the callable an import path ``pkg.module.fn`` / ``pkg.module:fn`` names."""
    if callable(function):
        return function
    if not isinstance(function, str) or not function.strip():
        raise ValueError(f"{where}: 'function' must be a callable or an import path, got {function!r:.80}")
    module_name, sep, attr = function.partition(":") if ":" in function else function.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{where}: function '{function}' must be an import path like 'my_pkg.rewards.my_fn'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{where}: function '{function}' could not be imported: {err}") from None
    if not callable(obj):
        raise ValueError(f"{where}: '{function}' is not callable (got {type(obj).__name__})")
    return obj


def function_constraint_class(name: str, function: RewardFunction) -> type[RewardFunctionConstraint]:
    """A ``RewardFunctionConstraint`` subclass bound to ``function``, so the registry stays a flat name → class map."""
    doc = (getattr(function, "__doc__", None) or "").strip()
    return type(
        f"RewardFunction_{name}",
        (RewardFunctionConstraint,),
        {
            "registry_name": name,
            "default_function": staticmethod(function),
            "__doc__": f"Reward function {_qualified_name(function)} as a constraint." + (f"\n\n{doc}" if doc else ""),
            "__module__": __name__,
        },
    )


def _qualified_name(function: Any) -> str:
    module, qualname = getattr(function, "__module__", None), getattr(function, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else repr(function)
