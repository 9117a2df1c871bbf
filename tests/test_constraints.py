import math

import pytest
import torch

from constraints import CONSTRAINTS, Constraint, LengthConstraint, build_constraint, build_constraints, register_constraint


def test_length_scores_tokens_and_costs_are_normalised():
    c = LengthConstraint(threshold=10, sense="at_most", scale=5)
    rewards, valid = c.evaluate(["p", "q"], ["a", "b"], [[1, 2, 3], list(range(20))])
    assert rewards.tolist() == [3.0, 20.0] and valid.all()
    assert c.cost(rewards).tolist() == pytest.approx([(3 - 10) / 5, (20 - 10) / 5])
    at_least = LengthConstraint(threshold=10, sense="at_least", scale=5)
    assert at_least.cost(rewards).tolist() == pytest.approx([(10 - 3) / 5, (10 - 20) / 5])


def test_registry_short_name_and_class_path():
    by_name = build_constraint({"name": "length", "threshold": 5, "scale": 2})
    by_path = build_constraint({"class_path": "constraints.LengthConstraint", "init_args": {"threshold": 5, "scale": 2, "sense": "at_least"}})
    assert isinstance(by_name, LengthConstraint) and by_name.name == "length"
    assert isinstance(by_path, LengthConstraint) and by_path.sense == "at_least"


def test_unknown_name_lists_registered_ones():
    with pytest.raises(ValueError, match=r"unknown constraint 'lenght'.*registered constraints: .*length"):
        build_constraint({"name": "lenght", "threshold": 5, "scale": 1})


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "length", "threshold": 5, "scale": 1, "sense": "less"}, "sense must be 'at_most' or 'at_least'"),
        ({"name": "length", "threshold": 5}, "scale is required"),
        ({"name": "length", "threshold": 5, "scale": 0}, "scale must be a finite number > 0"),
        ({"name": "length", "threshold": math.nan, "scale": 1}, "threshold must be a finite number"),
        ({"threshold": 5}, "needs 'name'"),
        ({"class_path": "nowhere.Thing", "init_args": {}}, "could not be imported"),
    ],
)
def test_bad_config_fails_with_a_named_field(spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build_constraint(spec)


def test_duplicate_names_rejected():
    spec = {"name": "length", "threshold": 5, "scale": 1}
    with pytest.raises(ValueError, match="unique"):
        build_constraints([spec, spec])
    # A length range [lo, hi] is two constraints with distinct names.
    lo = {"class_path": "constraints.LengthConstraint", "init_args": {"name": "min_len", "threshold": 2, "scale": 1, "sense": "at_least"}}
    hi = {"class_path": "constraints.LengthConstraint", "init_args": {"name": "max_len", "threshold": 9, "scale": 1}}
    assert [c.name for c in build_constraints([lo, hi])] == ["min_len", "max_len"]


class _Custom(Constraint):
    registry_name = "custom_test"
    default_scale = 1.0

    def __init__(self, values, **kwargs):
        super().__init__(**kwargs)
        self.values = values

    def score(self, prompts, completions, completion_ids, **columns):
        return self.values


def test_register_custom_constraint_and_invalid_scores():
    register_constraint("custom_test")(_Custom)
    try:
        ok = build_constraint({"name": "custom_test", "threshold": 0.0, "values": [1.0, None, 2.0]})
        rewards, valid = ok.evaluate(["p"] * 3, ["a"] * 3, [[1]] * 3)
        assert valid.tolist() == [True, False, True] and rewards[valid].tolist() == [1.0, 2.0]

        nan = build_constraint({"name": "custom_test", "threshold": 0.0, "values": [1.0, float("nan")]})
        with pytest.raises(ValueError, match=r"constraint 'custom_test'.*sample 1"):
            nan.evaluate(["p"] * 2, ["a"] * 2, [[1]] * 2)
        dropped = build_constraint({"name": "custom_test", "threshold": 0.0, "values": [1.0, float("inf")], "on_invalid": "drop"})
        assert dropped.evaluate(["p"] * 2, ["a"] * 2, [[1]] * 2)[1].tolist() == [True, False]

        short = build_constraint({"name": "custom_test", "threshold": 0.0, "values": torch.ones(1)})
        with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
            short.evaluate(["p"] * 2, ["a"] * 2, [[1]] * 2)
    finally:
        CONSTRAINTS.pop("custom_test")
