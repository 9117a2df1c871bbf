"""One flat mapping from short names to constraint classes, and the builder configs go through.

A config names a constraint either by short name::

    constraints:
      - name: length
        threshold: 20
        sense: at_most
        scale: 10

or, LightningCLI style, by any importable class::

      - class_path: my_package.MyConstraint
        init_args: {threshold: 0.5, sense: at_least}

or by a name that an installed package declares in the entry-point group
``l3m_lightning.constraints`` (``pip install my-constraints`` is all it takes)::

    [project.entry-points."l3m_lightning.constraints"]
    my_constraint = "my_constraints:MyConstraint"     # a Constraint subclass ...
    politeness = "my_constraints:politeness"           # ... or a plain reward function

Built-ins win over entry points of the same name. Entry points are looked up only for a name
that is not registered, and a loaded one is added to ``CONSTRAINTS``: there is one flat mapping.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable

from constraints.base import Constraint
from constraints.length import LengthConstraint
from constraints.reward_function import RewardFunctionConstraint, function_constraint_class
from constraints.reward_model import HarmlessnessConstraint, HelpfulnessConstraint, RewardModelConstraint

ENTRY_POINT_GROUP = "l3m_lightning.constraints"

CONSTRAINTS: dict[str, type[Constraint]] = {
    "length": LengthConstraint,
    "reward_function": RewardFunctionConstraint,
    "reward_model": RewardModelConstraint,
    "helpfulness": HelpfulnessConstraint,
    "harmlessness": HarmlessnessConstraint,
}


def register_constraint(name: str) -> Callable[[Any], Any]:
    """Decorator: make ``name`` usable as ``name: <name>`` in configs.

    Decorates a ``Constraint`` subclass, or a plain reward function
    ``fn(prompts, completions, completion_ids, **kwargs) -> list[float | None]`` (which is then
    wrapped in a ``RewardFunctionConstraint``; the function itself is returned unchanged).
    """

    def decorate(obj: Any) -> Any:
        cls = _as_constraint_class(name, obj, f"register_constraint('{name}')")
        if name in CONSTRAINTS and not _same_registration(CONSTRAINTS[name], cls):
            raise ValueError(f"constraint name '{name}' is already registered to {CONSTRAINTS[name].__qualname__}")
        CONSTRAINTS[name] = cls
        return obj

    return decorate


def resolve_constraint(name: str) -> type[Constraint]:
    """The class registered as ``name``: a built-in, a registered one, or one from an installed entry point."""
    if name in CONSTRAINTS:
        return CONSTRAINTS[name]
    entry_points = _entry_points()
    if name not in entry_points:
        plugins = sorted(set(entry_points) - set(CONSTRAINTS))
        raise ValueError(
            f"unknown constraint '{name}'; registered constraints: {', '.join(sorted(CONSTRAINTS))}; "
            f"from installed packages (entry points '{ENTRY_POINT_GROUP}'): {', '.join(plugins) or 'none'} "
            f"(or give a class_path)"
        )
    ep = entry_points[name]
    source = f"entry point '{name} = {ep.value}' (group '{ENTRY_POINT_GROUP}'{_distribution(ep)})"
    try:
        obj = ep.load()
    except Exception as err:  # a broken plugin must not look like a typo in the config
        raise ValueError(f"constraint '{name}': {source} could not be loaded: {type(err).__name__}: {err}") from err
    CONSTRAINTS[name] = _as_constraint_class(name, obj, source)
    return CONSTRAINTS[name]


def available_constraints() -> list[str]:
    """Every name a config can use: registered ones and those installed packages declare."""
    return sorted(set(CONSTRAINTS) | set(_entry_points()))


def build_constraint(spec: dict[str, Any] | Constraint) -> Constraint:
    """Instantiate one constraint from its config entry (or pass an instance through)."""
    if isinstance(spec, Constraint):
        return spec
    if not isinstance(spec, dict):
        raise TypeError(f"a constraint entry must be a mapping with 'name' or 'class_path', got {spec!r}")
    spec = dict(spec)
    if "class_path" in spec:
        cls = _import_class(spec.pop("class_path"))
        kwargs = {**spec.pop("init_args", {}), **spec}
    elif "name" in spec:
        key = spec.pop("name")
        cls = resolve_constraint(key)
        kwargs = {**spec.pop("init_args", {}), **spec}
        if cls is not RewardFunctionConstraint:  # a generic reward_function is named after its function
            kwargs.setdefault("name", key)
    else:
        raise ValueError(f"a constraint entry needs 'name' (one of: {', '.join(available_constraints())}) or 'class_path'; got keys {sorted(spec)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"constraint {cls.__name__}: {err}") from None


def build_constraints(specs: list[dict[str, Any] | Constraint] | None, where: str | None = None) -> list[Constraint]:
    """Build all constraints; their names must be unique (they key logs and checkpoints).

    ``where`` (e.g. ``"model.constraints"``) prefixes an entry's error with its config key,
    ``model.constraints[1]: constraint 'length': scale is required ...``, keeping the error's type.
    """
    built = []
    for i, spec in enumerate(specs or []):
        try:
            built.append(build_constraint(spec))
        except (ValueError, TypeError) as err:
            if where is None:
                raise
            try:
                prefixed = type(err)(f"{where}[{i}]: {err}")
            except Exception:  # an exception class that takes other arguments: keep it as it is
                raise err from None
            raise prefixed from err
    names = [c.name for c in built]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"constraint names must be unique, '{duplicates[0]}' appears more than once: give each a distinct name")
    return built


def _import_class(path: str) -> type[Constraint]:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        if path in available_constraints():
            return resolve_constraint(path)
        raise ValueError(f"class_path '{path}' must be a dotted path like 'my_package.MyConstraint'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"class_path '{path}' could not be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, Constraint)):
        if callable(cls) and not isinstance(cls, type):
            raise TypeError(
                f"class_path '{path}' is a function, not a Constraint subclass: use "
                f"{{name: reward_function, function: {path}, threshold: ..., scale: ...}}"
            )
        raise TypeError(f"class_path '{path}' is not a subclass of constraints.Constraint")
    return cls


def _as_constraint_class(name: str, obj: Any, source: str) -> type[Constraint]:
    if isinstance(obj, type):
        if issubclass(obj, Constraint):
            return obj
        raise TypeError(f"{source}: {obj!r} is a class but not a subclass of constraints.Constraint")
    if callable(obj):
        return function_constraint_class(name, obj)
    raise TypeError(f"{source}: {obj!r} is neither a Constraint subclass nor a reward function")


def _same_registration(a: type[Constraint], b: type[Constraint]) -> bool:
    """Re-registering the same class, or the same function again (e.g. a module re-imported), is not a clash."""
    fa, fb = getattr(a, "default_function", None), getattr(b, "default_function", None)
    return a is b or (fa is not None and fa is fb)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """Entry points of the group, read afresh each time (cheap, and sees packages installed since start-up).

    Two installed packages declaring the same name: the first one importlib.metadata finds wins.
    """
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def _distribution(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f", package {dist.name} {dist.version}" if dist is not None else ""
