"""The registry's three ways in (short name, class_path, entry point) and the reward-function adapter."""

import math
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

from constraints import (
    CONSTRAINTS,
    ENTRY_POINT_GROUP,
    ConstraintError,
    HarmlessnessConstraint,
    HelpfulnessConstraint,
    LengthConstraint,
    RewardFunctionConstraint,
    RewardModelConstraint,
    available_constraints,
    build_constraint,
    build_constraints,
    register_constraint,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_constraint"
BUILT_INS = {"length", "reward_function", "reward_model", "helpfulness", "harmlessness"}


# --- reward functions the configs below name by import path (f"{__name__}.<fn>") ---
def count_words(prompts, completions, completion_ids, **kwargs):
    return [float(len(c.split())) if c else None for c in completions]


def with_offset(prompts, completions, completion_ids, offset=0.0, **kwargs):
    return [len(ids) + offset for ids in completion_ids]


def exploding(prompts, completions, completion_ids, **kwargs):
    raise KeyError("boom")


def returns_nan(prompts, completions, completion_ids, **kwargs):
    return [1.0] + [math.nan] * (len(completions) - 1)


def returns_short(prompts, completions, completion_ids, **kwargs):
    return [1.0]


def returns_text(prompts, completions, completion_ids, **kwargs):
    return [1.0, "high"]


def _write_distribution(site: Path, name: str, entry_points: dict[str, str]) -> None:
    """A minimal installed distribution: what `pip install` leaves for importlib.metadata to find."""
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def restore_registry():
    before = dict(CONSTRAINTS)
    yield
    CONSTRAINTS.clear()
    CONSTRAINTS.update(before)


@pytest.fixture
def plugin_site(tmp_path, monkeypatch, restore_registry):
    """A site dir with a plugin module and its dist-info, on sys.path for this test only."""
    site = tmp_path / "site"
    (site / "my_plugin").mkdir(parents=True)
    (site / "my_plugin" / "__init__.py").write_text(
        textwrap.dedent(
            """
            from constraints import Constraint

            class MyConstraint(Constraint):
                default_scale = 1.0

                def score(self, prompts, completions, completion_ids, **columns):
                    return [float(c.count("!")) for c in completions]

            def shout_reward(prompts, completions, completion_ids, **kwargs):
                return [float(c.isupper()) for c in completions]

            NOT_CALLABLE = 3
            """
        )
    )
    _write_distribution(
        site,
        "my-plugin",
        {
            "my_constraint": "my_plugin:MyConstraint",
            "shout": "my_plugin:shout_reward",
            "broken": "my_plugin_missing:Thing",
            "not_callable": "my_plugin:NOT_CALLABLE",
            "length": "my_plugin:MyConstraint",  # a plugin cannot shadow a built-in
        },
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    for module in [m for m in sys.modules if m == "my_plugin" or m.startswith("my_plugin.")]:
        del sys.modules[module]


# --- registry ----------------------------------------------------------------------------------------
def test_built_ins_are_registered_by_short_name():
    assert BUILT_INS <= set(CONSTRAINTS)
    assert CONSTRAINTS["reward_function"] is RewardFunctionConstraint
    assert CONSTRAINTS["reward_model"] is RewardModelConstraint
    assert CONSTRAINTS["helpfulness"] is HelpfulnessConstraint and CONSTRAINTS["harmlessness"] is HarmlessnessConstraint


def test_entry_point_constraint_class_resolves_by_name(plugin_site):
    assert "my_constraint" not in CONSTRAINTS  # loaded lazily, on first use
    c = build_constraint({"name": "my_constraint", "threshold": 1.0})
    assert type(c).__name__ == "MyConstraint" and c.name == "my_constraint"
    assert CONSTRAINTS["my_constraint"] is type(c)  # now in the one flat mapping
    rewards, valid = c.evaluate(["p", "q"], ["hi!!", "hi"], [[1], [2]])
    assert rewards.tolist() == [2.0, 0.0] and valid.all()


def test_entry_point_reward_function_resolves_by_name(plugin_site):
    c = build_constraint({"name": "shout", "threshold": 0.5, "sense": "at_least", "scale": 0.5})
    assert isinstance(c, RewardFunctionConstraint) and c.name == "shout"
    assert c.evaluate(["p", "q"], ["HEY", "hey"], [[1], [2]])[0].tolist() == [1.0, 0.0]


def test_entry_points_never_shadow_built_ins(plugin_site):
    assert isinstance(build_constraint({"name": "length", "threshold": 5, "scale": 1}), LengthConstraint)


def test_unknown_name_lists_built_ins_and_entry_points(plugin_site):
    with pytest.raises(ValueError) as info:
        build_constraint({"name": "my_constrait", "threshold": 1.0})
    message = str(info.value)
    assert "unknown constraint 'my_constrait'" in message
    registered, plugins = message.split("from installed packages")
    assert all(name in registered for name in BUILT_INS)
    assert all(name in plugins for name in ("my_constraint", "shout", "broken"))
    assert ENTRY_POINT_GROUP in message and "class_path" in message
    assert {"my_constraint", "shout"} <= set(available_constraints())


def test_broken_entry_points_fail_naming_the_plugin(plugin_site):
    with pytest.raises(ValueError, match=r"constraint 'broken': entry point 'broken = my_plugin_missing:Thing'.*my-plugin.*could not be loaded"):
        build_constraint({"name": "broken", "threshold": 1.0, "scale": 1.0})
    with pytest.raises(TypeError, match="neither a Constraint subclass nor a reward function"):
        build_constraint({"name": "not_callable", "threshold": 1.0, "scale": 1.0})


def test_example_plugin_package_entry_points(tmp_path, monkeypatch, restore_registry):
    """The shipped examples/custom_constraint package, with the entry points its pyproject declares."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    declared = project["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert set(declared) == {"no_digits", "politeness"}
    site = tmp_path / "site"
    _write_distribution(site, project["project"]["name"], declared)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    try:
        no_digits = build_constraint({"name": "no_digits", "threshold": 0.05})  # default_scale 0.1
        assert no_digits.scale == 0.1
        assert no_digits.evaluate(["p", "p"], ["a1", "ab"], [[1], [1]])[0].tolist() == [0.5, 0.0]
        polite = build_constraint({"name": "politeness", "threshold": 0.5, "sense": "at_least", "scale": 0.5, "kwargs": {"words": ["thanks"]}})
        rewards, valid = polite.evaluate(["p"] * 3, ["Thanks!", "no", ""], [[1]] * 3)
        assert valid.tolist() == [True, True, False] and rewards[valid].tolist() == [1.0, 0.0]
    finally:
        sys.modules.pop("l3m_custom_constraint", None)


def test_class_path_to_a_function_points_to_reward_function():
    with pytest.raises(TypeError, match="is a function.*name: reward_function"):
        build_constraint({"class_path": f"{__name__}.count_words", "init_args": {"threshold": 1}})


def test_register_constraint_accepts_a_reward_function(restore_registry):
    returned = register_constraint("word_count")(count_words)
    assert returned is count_words
    register_constraint("word_count")(count_words)  # same function again: not a clash
    c = build_constraint({"name": "word_count", "threshold": 3, "scale": 3})
    assert c.name == "word_count" and c.evaluate(["p"], ["a b"], [[1]])[0].tolist() == [2.0]
    with pytest.raises(ValueError, match="already registered"):
        register_constraint("word_count")(with_offset)


# --- reward functions ----------------------------------------------------------------------------------
def test_reward_function_from_config_with_none_drops_samples():
    c = build_constraint({"name": "reward_function", "function": f"{__name__}.count_words", "threshold": 3, "sense": "at_most", "scale": 2})
    assert isinstance(c, RewardFunctionConstraint) and c.name == "count_words"  # named after the function
    rewards, valid = c.evaluate(["p"] * 3, ["one two", "", "a b c d e"], [[1], [], [1]])
    assert valid.tolist() == [True, False, True]
    assert rewards[valid].tolist() == [2.0, 5.0]
    assert c.cost(rewards[valid]).tolist() == pytest.approx([(2 - 3) / 2, (5 - 3) / 2])


def test_reward_function_callable_colon_path_and_kwargs():
    direct = RewardFunctionConstraint(with_offset, threshold=1.0, scale=1.0, kwargs={"offset": 0.5})
    colon = build_constraint({"name": "reward_function", "function": f"{__name__}:with_offset", "threshold": 1, "scale": 1, "init_args": {"name": "len2"}})
    ids = [[1, 2], [3]]
    assert direct.evaluate(["p", "q"], ["a", "b"], ids)[0].tolist() == [2.5, 1.5]
    assert colon.name == "len2" and colon.evaluate(["p", "q"], ["a", "b"], ids)[0].tolist() == [2.0, 1.0]
    two = build_constraints(
        [
            {"name": "reward_function", "function": f"{__name__}.count_words", "threshold": 1, "scale": 1},
            {"name": "reward_function", "function": f"{__name__}.with_offset", "threshold": 1, "scale": 1},
        ]
    )
    assert [c.name for c in two] == ["count_words", "with_offset"]


@pytest.mark.parametrize(
    "function, error, message",
    [
        ("exploding", ConstraintError, r"constraint 'exploding': reward function .*exploding raised KeyError: 'boom'"),
        ("returns_nan", ConstraintError, r"constraint 'returns_nan'.*returned nan for sample 1"),
        ("returns_short", ConstraintError, r"constraint 'returns_short'.*returned 1 values for 3 completions"),
        ("returns_text", ConstraintError, r"constraint 'returns_text'.*returned 'high' for sample 1"),
    ],
)
def test_reward_function_bad_output_names_constraint_and_sample(function, error, message):
    c = build_constraint({"name": "reward_function", "function": f"{__name__}.{function}", "threshold": 0, "scale": 1})
    with pytest.raises(error, match=message):
        c.evaluate(["p"] * 3, ["a", "b", "c"], [[1]] * 3)


def test_reward_function_nan_can_be_dropped():
    c = build_constraint({"name": "reward_function", "function": f"{__name__}.returns_nan", "threshold": 0, "scale": 1, "on_invalid": "drop"})
    assert c.evaluate(["p"] * 2, ["a", "b"], [[1]] * 2)[1].tolist() == [True, False]


def test_plugin_exception_keeps_its_cause():
    c = RewardFunctionConstraint(exploding, threshold=0, scale=1)
    with pytest.raises(ConstraintError) as info:
        c.evaluate(["p"], ["a"], [[1]])
    assert isinstance(info.value.__cause__, KeyError)


def test_constraint_subclass_that_raises_is_named():
    class Flaky(LengthConstraint):
        def score(self, *args, **kwargs):
            raise RuntimeError("scorer down")

    with pytest.raises(ConstraintError, match=r"constraint 'flaky': score\(\) raised RuntimeError: scorer down"):
        Flaky(threshold=1, scale=1, name="flaky").evaluate(["p"], ["a"], [[1]])


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "reward_function", "threshold": 1, "scale": 1}, "'function' is required"),
        ({"name": "reward_function", "function": "nowhere.fn", "threshold": 1, "scale": 1}, "could not be imported"),
        ({"name": "reward_function", "function": "math.pi", "threshold": 1, "scale": 1}, "is not callable"),
        ({"name": "reward_function", "function": "count_words", "threshold": 1, "scale": 1}, "must be an import path"),
        ({"name": "reward_function", "function": f"{__name__}.count_words", "threshold": 1}, "scale is required"),
        ({"name": "reward_function", "function": f"{__name__}.count_words", "threshold": 1, "scale": 1, "sense": "max"}, "sense must be"),
        ({"name": "reward_function", "function": f"{__name__}.count_words", "scale": 1}, "threshold must be a finite number"),
    ],
)
def test_reward_function_config_errors(spec, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build_constraint(spec)


def test_tensor_output_accepted():
    def as_tensor(prompts, completions, completion_ids, **kwargs):
        return torch.arange(len(completions), dtype=torch.float32)

    c = RewardFunctionConstraint(as_tensor, threshold=0, scale=1)
    assert c.evaluate(["p"] * 3, ["a"] * 3, [[1]] * 3)[0].tolist() == [0.0, 1.0, 2.0]
