"""The option groups (``l3m_lightning.options``): their checks, the CLI's view of them, and the keys that moved."""

import warnings

import pytest
import yaml

from l3m_lightning.cli import main
from l3m_lightning.options import (
    GROUPS, MOVED_KEYS, BarrierArgs, EvaluationArgs, MultiplierArgs, OptimizerArgs, PolicyArgs, SamplingArgs, ValueBaselineArgs,
    as_group, moved_key_errors, moved_keys_in_argv, moved_keys_in_config, upgrade_hparams,
)


@pytest.mark.parametrize("build, message", [
    (lambda: PolicyArgs(torch_dtype="float33"), "model.policy.torch_dtype must be a torch dtype name"),
    (lambda: SamplingArgs(generation_batch_size=0), "model.sampling.generation_batch_size must be >= 1 sequences"),
    (lambda: BarrierArgs(mu_floor=0.0), "model.barrier.mu_floor must be a finite number > 0"),
    (lambda: MultiplierArgs(method="penalty"), "model.multipliers.penalty_weights is required for method 'penalty'"),
    (lambda: MultiplierArgs(method="dual"), "model.multipliers.method must be one of barrier, lagrangian, penalty"),
    (lambda: ValueBaselineArgs(width=-1), "model.value_baseline.width must be >= 0"),
    (lambda: ValueBaselineArgs(gae_lambda=0.9), "model.value_baseline.gae_lambda=0.9 needs model.value_baseline.enabled: true"),
    (lambda: OptimizerArgs(betas=(0.9, 1.0)), r"model.optimizer.betas must be two numbers in \[0, 1\)"),
    (lambda: EvaluationArgs(log_samples_every_n_steps=-1), "model.evaluation.log_samples_every_n_steps must be >= 0"),
])
def test_each_group_checks_itself_naming_the_full_key(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_groups_are_immutable_and_read_from_mappings():
    barrier = as_group(BarrierArgs, {"mu_floor": 0.2})
    assert barrier == BarrierArgs(mu_floor=0.2) and as_group(BarrierArgs, None) == BarrierArgs()
    assert as_group(OptimizerArgs, {"betas": [0.8, 0.9]}).betas == (0.8, 0.9)
    with pytest.raises(AttributeError):
        barrier.mu_floor = 0.3  # type: ignore[misc]
    with pytest.raises(ValueError, match="model.sampling: unknown option 'num_sample'"):
        as_group(SamplingArgs, {"num_sample": 2})


def test_every_moved_key_names_an_existing_field():
    for old, new in MOVED_KEYS.items():
        group, field = new.split(".")
        assert field in GROUPS[group].__dataclass_fields__, (old, new)


def test_moved_keys_are_found_in_configs_and_on_the_command_line():
    assert moved_keys_in_config({"model": {"mu_floor": 0.1, "barrier": {"mu_start": 1.0}, "constraints": []}}) == [
        ("model.mu_floor", "model.barrier.mu_floor")]
    assert moved_keys_in_config({"fit": {"model": {"eval_num_samples": 2}}}) == [("model.eval_num_samples", "model.evaluation.num_samples")]
    assert moved_keys_in_config({"model": {"value_baseline": {"enabled": True}}}) == []  # the new group
    assert moved_keys_in_config({"model": {"value_baseline": False}}) == [("model.value_baseline", "model.value_baseline.enabled")]
    argv = ["fit", "--model.learning_rate", "1e-3", "--model.optimizer.learning_rate", "1e-3", "--model.value_baseline", "cfg.yaml"]
    assert moved_keys_in_argv(argv) == [("model.learning_rate", "model.optimizer.learning_rate")]
    assert moved_keys_in_argv(["--model.model_name_or_path=x"]) == [("model.model_name_or_path", "model.policy.name_or_path")]


def test_moved_key_errors_name_the_file(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  model_config: {hidden_size: 8}\n")
    assert moved_key_errors(["fit", "--config", str(old)]) == [f"{old}: model.model_config moved to model.policy.config"]
    assert moved_key_errors(["fit", f"--config={old}", "--model.top_k", "3"]) == [
        f"{old}: model.model_config moved to model.policy.config", "command line: model.top_k moved to model.sampling.top_k"]
    assert moved_key_errors(["fit", "--config", str(tmp_path / "missing.yaml")]) == []  # the parser reports that one


def test_old_checkpoint_hyperparameters_are_upgraded():
    old = {"model_name_or_path": "embedded", "constraints": [], "value_baseline": True, "value_head_lr": 0.05,
           "mu_floor": 0.2, "export_dir": None, "sft_loss_reduction": "sequence"}
    assert upgrade_hparams(old) == {"policy": {"name_or_path": "embedded"}, "constraints": [], "value_baseline": {"enabled": True, "lr": 0.05},
                                    "barrier": {"mu_floor": 0.2}, "export_dir": None, "sft_loss_reduction": "sequence"}


def test_help_lists_the_groups_with_their_docs(capfd):
    with pytest.raises(SystemExit) as caught:
        main(["fit", "--help"])
    assert caught.value.code == 0
    out = capfd.readouterr().out
    for group in GROUPS:
        assert f"--model.{group}" in out
    assert "--model.barrier.mu_floor" in out and "μ never decays below this" in out
    assert "--model.sampling.num_samples" in out and "--model.mu_floor" not in out


def test_print_config_shows_every_group_with_its_defaults(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit):
            main(["fit", "--print_config", "--model.barrier.mu_floor", "0.2"])
    model = yaml.safe_load(capfd.readouterr().out)["model"]
    assert model["barrier"] == {**BarrierArgs().to_dict(), "mu_floor": 0.2}
    for name, cls in GROUPS.items():
        assert "class_path" not in model[name] and set(model[name]) == set(cls().to_dict())
    assert model["sampling"] == SamplingArgs().to_dict() and model["export_dir"] is None
