"""Constraint plugins: the base class, the built-ins and the registry configs name them through."""

from constraints.base import SENSES, ConfigError, Constraint, ConstraintError
from constraints.length import LengthConstraint
from constraints.registry import (
    CONSTRAINTS,
    ENTRY_POINT_GROUP,
    available_constraints,
    build_constraint,
    build_constraints,
    register_constraint,
    resolve_constraint,
)
from constraints.reward_function import RewardFunctionConstraint
from constraints.reward_model import HarmlessnessConstraint, HelpfulnessConstraint, RewardModelConstraint

__all__ = [
    "CONSTRAINTS",
    "ConfigError",
    "ENTRY_POINT_GROUP",
    "SENSES",
    "Constraint",
    "ConstraintError",
    "HarmlessnessConstraint",
    "HelpfulnessConstraint",
    "LengthConstraint",
    "RewardFunctionConstraint",
    "RewardModelConstraint",
    "available_constraints",
    "build_constraint",
    "build_constraints",
    "register_constraint",
    "resolve_constraint",
]
