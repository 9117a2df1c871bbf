"""Outputs are checked before the first training step: writable log, checkpoint and export folders, and no clobbered export.

Running as root, ``chmod`` does not stop writes, so an unwritable folder is made the portable way:
a path *under a regular file* (``some_file/ckpts``), which no user can create.
"""

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from constraints import ConfigError
from l3m_lightning.cli import main
from l3m_lightning.module import L3MModule
from l3m_lightning.outputs import EXPORT_MARKER, check_export_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


def cli_args(tmp_path: Path, *args: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs" / "sft.yaml"), "--model.policy.config", json.dumps(TINY),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.callbacks.init_args.dirpath", str(tmp_path / "ckpt"),
            "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--data.embedded_num_prompts", "40", "--data.batch_size", "4", *args]


@pytest.fixture()
def no_steps(monkeypatch):
    """Any training step fails the test: the checks must come first."""
    monkeypatch.setattr(L3MModule, "training_step", lambda *a, **k: pytest.fail("a training step ran before the output check"))


def error_line(capfd, argv) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as caught:
            main(argv)
    assert caught.value.code == 2
    return capfd.readouterr().err.rstrip().splitlines()[-1]


def test_unwritable_checkpoint_export_and_log_folders_fail_before_any_step(capfd, tmp_path, no_steps):
    blocker = tmp_path / "some_file"
    blocker.write_text("a file, not a folder")
    line = error_line(capfd, cli_args(tmp_path, "--trainer.callbacks.init_args.dirpath", str(blocker / "ckpts")))
    assert line.startswith(f"error: trainer.callbacks: ModelCheckpoint dirpath: cannot write to {blocker / 'ckpts'}: ")
    line = error_line(capfd, cli_args(tmp_path, "--model.export_dir", str(blocker / "export")))
    assert line.startswith(f"error: model.export_dir: cannot write to {blocker}: ") or line.startswith(f"error: model.export_dir: {blocker} is a file")
    line = error_line(capfd, cli_args(tmp_path, "--trainer.logger.init_args.save_dir", str(blocker / "runs")))
    assert line.startswith("error: trainer.logger.init_args.save_dir: cannot write to ")


def test_a_non_empty_export_folder_is_not_clobbered(capfd, tmp_path, no_steps):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    line = error_line(capfd, cli_args(tmp_path, "--model.export_dir", str(tmp_path / "mine")))
    assert line.startswith(f"error: model.export_dir: {tmp_path / 'mine'} already exists and is not empty")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_check_runs_in_on_fit_start_without_the_cli(tmp_path, no_steps):
    """Trainer.fit on its own (no CLI): the module's on_fit_start checks the resolved checkpoint folder."""
    from l3m_lightning.data import ChatDataModule

    (tmp_path / "f").write_text("")
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "f" / "ckpt")], default_root_dir=tmp_path)
    module = L3MModule(policy={"config": TINY}, export_dir="")
    with pytest.raises(ConfigError, match="ModelCheckpoint dirpath: cannot write to .*f/ckpt"):
        trainer.fit(module, datamodule=ChatDataModule(embedded_num_prompts=40, batch_size=4))


def test_resuming_may_replace_its_own_earlier_export(capfd, tmp_path):
    export = tmp_path / "export"
    main(cli_args(tmp_path, "--model.export_dir", str(export)))
    marker = json.loads((export / EXPORT_MARKER).read_text())
    assert marker["checkpoint_dirs"] == [str((tmp_path / "ckpt").resolve())] and marker["global_step"] == 1
    # the same run, continued: allowed, and the export is replaced
    main(cli_args(tmp_path, "--model.export_dir", str(export), "--trainer.max_steps", "2", "--ckpt_path", "last"))
    assert json.loads((export / EXPORT_MARKER).read_text())["global_step"] == 2
    # a new run (no --ckpt_path) writing to the same folder: refused
    line = error_line(capfd, cli_args(tmp_path, "--model.export_dir", str(export)))
    assert "already exists and is not empty" in line


def test_export_folder_rule(tmp_path):
    target, ckpt, other = tmp_path / "export", tmp_path / "ckpt", tmp_path / "other"
    check_export_dir(target, "model.export_dir", None, [])  # missing: fine, and left missing
    assert not target.exists() and tmp_path.is_dir()
    target.mkdir()
    check_export_dir(target, "model.export_dir", None, [])  # empty: fine
    (target / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already exists and is not empty"):  # someone's folder
        check_export_dir(target, "model.export_dir", str(ckpt / "last.ckpt"), [ckpt])
    (target / EXPORT_MARKER).write_text(json.dumps({"checkpoint_dirs": [str(ckpt.resolve())]}))
    check_export_dir(target, "model.export_dir", str(ckpt / "last.ckpt"), [ckpt])  # our export, this run resumed
    check_export_dir(target, "model.export_dir", "last", [ckpt])
    with pytest.raises(ConfigError, match="already exists"):  # our export, but a fresh run
        check_export_dir(target, "model.export_dir", None, [ckpt])
    with pytest.raises(ConfigError, match="already exists"):  # our export, resumed from another run's checkpoints
        check_export_dir(target, "model.export_dir", str(other / "last.ckpt"), [other])
