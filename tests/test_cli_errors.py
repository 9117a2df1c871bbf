"""The command line's error rule: a config or data mistake is one ``error:`` line and exit 2; a bug keeps its traceback.

In-process ``main([...])`` (the same function ``python cli.py`` runs) on the quickstart config with a
tiny model; the subprocess and terminal path is covered by test_no_remote_code.py.
"""

import json
import warnings
from pathlib import Path

import pytest

from constraints import ConfigError
from l3m_lightning.cli import main
from l3m_lightning.errors import mark_run_phase, tidy_parse_error, user_error_message

ROOT = Path(__file__).resolve().parents[1]
TINY = "{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}"


def quick(tmp_path: Path, *args: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.policy.config", TINY,
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"),
            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--data.embedded_num_prompts", "40", *args]


def error_line(capfd, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2, and return its last stderr line (which must be the only ``error:`` line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as caught:
            main(argv)
    assert caught.value.code == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().splitlines()[-1] == lines[0], err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def test_abbreviated_option_is_not_accepted(capfd, tmp_path):
    line = error_line(capfd, quick(tmp_path, "--model.sampling.num_sample", "2"))
    assert line == "error: unrecognized arguments: --model.sampling.num_sample 2 (did you mean --model.sampling.num_samples?)"


def test_unknown_key_in_a_config_file_suggests_the_real_one(capfd, tmp_path):
    (tmp_path / "typo.yaml").write_text("model:\n  sampling:\n    num_samplez: 3\n")
    line = error_line(capfd, quick(tmp_path, "--config", str(tmp_path / "typo.yaml")))
    assert line == "error: Subcommand 'fit' does not accept option 'model.sampling.num_samplez' (did you mean --model.sampling.num_samples?)"


def test_wrong_type_is_one_line_naming_the_key(capfd, tmp_path):
    assert error_line(capfd, quick(tmp_path, "--model.sampling.num_samples", "abc")) == "error: model.sampling.num_samples: expected int, got abc"


def test_mu_errors_name_the_yaml_keys(capfd, tmp_path):
    line = error_line(capfd, quick(tmp_path, "--model.barrier.mu_floor", "5"))
    assert line.startswith("error: model.barrier.mu_floor (5) must be <= model.barrier.mu_start (1)") and "mu_schedule" not in line
    assert "model.barrier.mu_decay must be in (0, 1]" in error_line(capfd, quick(tmp_path, "--model.barrier.mu_decay", "1.5"))
    assert "model.barrier.mu_decay_every must be a positive number of steps" in error_line(capfd, quick(tmp_path, "--model.barrier.mu_decay_every", "0"))


@pytest.mark.parametrize("option, value, message", [
    ("policy.torch_dtype", "float33", "model.policy.torch_dtype must be a torch dtype name"),
    ("sampling.top_p", "0", "model.sampling.top_p must be in (0, 1]"),
    ("barrier.infeasibility_patience", "-1", "model.barrier.infeasibility_patience must be >= 0 steps"),
    ("multipliers.ema", "1.0", "model.multipliers.ema must be in [0, 1)"),
    ("value_baseline.lr", "0", "model.value_baseline.lr must be > 0"),
    ("optimizer.warmup_ratio", "2", "model.optimizer.warmup_ratio must be in [0, 1]"),
    ("evaluation.num_samples", "0", "model.evaluation.num_samples must be >= 1"),
])
def test_each_option_group_checks_its_ranges_naming_the_full_key(capfd, tmp_path, option, value, message):
    assert error_line(capfd, quick(tmp_path, f"--model.{option}", value)).startswith(f"error: {message}")


def test_a_moved_key_fails_naming_its_new_place(capfd, tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  num_samples: 4\n  mu_floor: 0.1\n")
    assert error_line(capfd, quick(tmp_path, "--config", str(old))) == f"error: {old}: model.num_samples moved to model.sampling.num_samples"
    line = error_line(capfd, quick(tmp_path, "--model.constraint_ema", "0.5"))
    assert line == "error: command line: model.constraint_ema moved to model.multipliers.ema"
    line = error_line(capfd, quick(tmp_path, "--model.value_baseline=true"))
    assert line == "error: command line: model.value_baseline moved to model.value_baseline.enabled"
    (tmp_path / "flag.yaml").write_text("model:\n  value_baseline: true\n")
    line = error_line(capfd, quick(tmp_path, "--config", str(tmp_path / "flag.yaml")))
    assert line == f"error: {tmp_path / 'flag.yaml'}: model.value_baseline moved to model.value_baseline.enabled"


def test_errors_raised_while_building_classes_are_one_line(capfd, tmp_path):
    line = error_line(capfd, quick(tmp_path, "--model.constraints", "[{name: length, threshold: 3}]"))
    assert line.startswith("error: model.constraints[0]: constraint 'length': scale is required")
    # jsonargparse wraps a callback's own error in its "Union subtypes" ValueError: the callback's message is printed
    line = error_line(capfd, quick(tmp_path, "--trainer.callbacks.init_args.every_n_train_steps", "-3"))
    assert line == "error: Invalid value for every_n_train_steps=-3. Must be >= 0"
    line = error_line(capfd, quick(tmp_path, "--model.policy.name_or_path", str(tmp_path / "no-model")))
    assert line == f"error: model.policy.name_or_path: no such file or folder: {tmp_path / 'no-model'}"


def test_missing_checkpoint_is_one_line(capfd, tmp_path):
    line = error_line(capfd, quick(tmp_path, "--ckpt_path", str(tmp_path / "nothing.ckpt")))
    assert line == f"error: ckpt_path: no such file or folder: {tmp_path / 'nothing.ckpt'}"


def test_data_error_during_fit_is_one_line_and_L3M_DEBUG_shows_the_traceback(capfd, tmp_path, monkeypatch):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(30)]
    rows[20]["response"] = None
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    argv = quick(tmp_path, "--data.dataset", str(data))
    assert error_line(capfd, argv) == f"error: {data} line 21: field 'response' must be a non-empty string, got None"
    monkeypatch.setenv("L3M_DEBUG", "1")
    with pytest.raises(ConfigError, match="line 21"):
        main(argv)


def test_an_unexpected_exception_during_training_keeps_its_traceback(tmp_path, monkeypatch):
    from l3m_lightning.module import L3MModule

    def broken(self, batch, batch_idx):
        raise RuntimeError("a bug in the step")

    monkeypatch.setattr(L3MModule, "training_step", broken)
    with pytest.raises(RuntimeError, match="a bug in the step"):  # not SystemExit: Python prints the traceback
        main(quick(tmp_path))


def test_reward_model_cli_reports_one_line(capfd, tmp_path):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"chosen": "a", "rejected": "b"}))
    line = error_line(capfd, ["rm", "fit", "--model.model_name_or_path", str(tmp_path / "no-rm"), "--data.dataset", str(tmp_path / "pairs.jsonl")])
    assert line == f"error: model.model_name_or_path: no such file or folder: {tmp_path / 'no-rm'}"


def _wrapped_by_jsonargparse(inner: BaseException) -> BaseException:
    """What jsonargparse does to a class's error: its own ValueError, raised from inside jsonargparse, caused by the original."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--x", type=int)
    try:
        try:
            raise inner
        except BaseException as err:
            parser.parse_args(["--x", "not-a-number"])  # raises inside jsonargparse; chain it as jsonargparse would
            raise AssertionError from err  # pragma: no cover
    except Exception as outer:
        outer.__cause__ = inner
        return outer


@pytest.mark.parametrize("err, phase, expected", [
    (ConfigError("data.x: bad row"), "run", "data.x: bad row"),            # ours: one line whenever raised
    (ValueError("model.y must be > 0"), "build", "model.y must be > 0"),  # a class's own check while building
    (ValueError("shape mismatch"), "run", None),                          # once running, only ConfigError is one line
    (RuntimeError("CUDA out of memory"), "run", None),
    (AttributeError("'NoneType' has no attribute 'x'"), "build", None),   # a bug while building: traceback
    (FileNotFoundError(2, "No such file or directory", "/x/y"), "build", "[Errno 2] No such file or directory: '/x/y'"),
])
def test_the_rule(err, phase, expected):
    if phase == "run":
        mark_run_phase(err)
    assert user_error_message(err) == expected


def test_the_innermost_cause_behind_a_jsonargparse_wrapper():
    wrapped = _wrapped_by_jsonargparse(ValueError("every_n must be >= 0\nsecond line"))
    assert user_error_message(wrapped) == "every_n must be >= 0 second line"
    assert user_error_message(_wrapped_by_jsonargparse(KeyError("bug"))) is None


def test_union_parse_errors_become_one_readable_line():
    message = ('Parser key "model.constraints":\n  Does not validate against any of the Union subtypes\n'
               "  Subtypes: [list[dict[str, typing.Any]], <class 'NoneType'>]\n  Errors:\n    - Expected a <class 'list'>\n"
               "    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: 5")
    assert tidy_parse_error(message, []) == "model.constraints: expected list[dict[str, Any]] or NoneType, got 5 (str)"


def test_reward_model_held_out_calibration_without_statistics_is_one_line(capfd, tmp_path):
    folder = tmp_path / "rm-export"
    folder.mkdir()  # an RM folder without l3m_reward_model.json: fails while the config is built, before any loading
    spec = f"[{{name: harmlessness, model_name_or_path: {folder}, threshold: 0.45, calibration: held_out}}]"
    line = error_line(capfd, quick(tmp_path, "--model.constraints", spec))
    assert line == (f"error: model.constraints[0]: constraint 'harmlessness': calibration: held_out needs {folder / 'l3m_reward_model.json'} "
                    "with held-out reward mean/std (export the RM with `cli.py rm fit`), got none")
