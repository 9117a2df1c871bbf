"""Where a run's outputs go (shared by the policy and reward-model modules), checked before the first step.

``check_fit_outputs`` runs before training (from the CLI's ``before_fit`` and again in each module's
``on_fit_start``): the log dir, every ``ModelCheckpoint`` dirpath and the export folder must be
writable (created if missing — the export folder only for the check — and a temp file is written
and removed in each), and the export
folder must not be an existing non-empty folder the export would replace — unless it holds our
``l3m_export.json`` marker naming a checkpoint folder this fit resumes from (``--ckpt_path``):
the same run continued. Otherwise a ``ConfigError``, one line, before any step is spent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L

from constraints.base import ConfigError

#: Written into every export: which run (checkpoint folders) it came from, so that run may replace it when resumed.
EXPORT_MARKER = "l3m_export.json"
#: ``--ckpt_path`` values Lightning resolves itself (to this run's checkpoint folders).
_SYMBOLIC_CKPT_PATHS = ("last", "best", "hpc", "registry")


def resolve_export_dir(export_dir: str | None, trainer: L.Trainer) -> Path | None:
    """``""`` disables export; ``None`` means ``<log dir>/hf_model``; anything else is the folder."""
    if export_dir == "":
        return None
    if export_dir:
        return Path(export_dir)
    return Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"


def save_pretrained_atomically(target: Path, model: Any, tokenizer: Any, marker: dict[str, Any] | None = None, **model_kwargs: Any) -> None:
    """``save_pretrained`` into a sibling temp folder, then swap it in: a crash never leaves half a model.

    ``marker``: the contents of ``EXPORT_MARKER`` (``export_marker(trainer)``), written with the model.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, **model_kwargs)
    tokenizer.save_pretrained(tmp)
    if marker is not None:
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The folders the trainer's ``ModelCheckpoint`` callbacks write to (those already known: an unset dirpath is resolved at setup)."""
    return [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None) and _is_local(cb.dirpath)]


def _is_local(path: Any) -> bool:
    """A local path (remote ones, ``s3://...``, are left to their filesystem)."""
    return "://" not in str(path)


def export_marker(trainer: L.Trainer) -> dict[str, Any]:
    """What ``EXPORT_MARKER`` records: the run's checkpoint folders, so a resumed fit of the same run may replace the export."""
    return {"checkpoint_dirs": [str(d.resolve()) for d in checkpoint_dirs(trainer)], "global_step": int(trainer.global_step)}


def check_writable(folder: Path, option: str, keep: bool = True) -> None:
    """Create ``folder`` if missing and write and remove a temp file in it; else one ``ConfigError`` line naming ``option``.

    ``keep=False`` removes the folder again if this call created it (the export folder appears only
    when there is an export). Running as root, permission bits do not stop writes: a read-only
    mount or a path under a regular file still fail here.
    """
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{option}: {folder} is a file, not a folder")
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".l3m-write-check-"):
            pass
        if created and not keep:
            folder.rmdir()
    except OSError as err:
        raise ConfigError(f"{option}: cannot write to {folder}: {err.strerror or err}") from None


def check_export_dir(target: Path, option: str, ckpt_path: str | None, ckpt_dirs: list[Path]) -> None:
    """The export folder is writable (so is its parent, where the atomic swap's temp folder goes) and clobbers nothing.

    A non-empty ``target`` is accepted only as this run's own earlier export: it has ``EXPORT_MARKER``
    and this fit resumes (``ckpt_path``) from a checkpoint folder the marker names.
    """
    target = Path(target)
    if target.is_dir() and any(target.iterdir()) and not _own_earlier_export(target, ckpt_path, ckpt_dirs):
        raise ConfigError(
            f"{option}: {target} already exists and is not empty, and the export at the end of fit would replace it; "
            f"choose another folder or empty it (a run resumed with --ckpt_path may replace its own earlier export)"
        )
    check_writable(target.parent, option)
    check_writable(target, option, keep=False)


def _own_earlier_export(target: Path, ckpt_path: str | None, ckpt_dirs: list[Path]) -> bool:
    marker = target / EXPORT_MARKER
    if not ckpt_path or not marker.is_file():
        return False
    try:
        recorded = {Path(p).resolve() for p in json.loads(marker.read_text()).get("checkpoint_dirs", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return False
    resumed = [Path(ckpt_path).parent] if str(ckpt_path) not in _SYMBOLIC_CKPT_PATHS else ckpt_dirs
    return any(d.resolve() in recorded for d in resumed)


def check_ckpt_path(ckpt_path: str | None) -> None:
    """A ``--ckpt_path`` that names a local file which is not there: one line now, not Lightning's traceback from inside fit."""
    if ckpt_path and str(ckpt_path) not in _SYMBOLIC_CKPT_PATHS and _is_local(ckpt_path) and not Path(ckpt_path).expanduser().exists():
        raise ConfigError(f"ckpt_path: no such file or folder: {ckpt_path}")


def log_dir_option(trainer: L.Trainer) -> str:
    """The config key that set the log dir: the logger's ``save_dir``, else ``trainer.default_root_dir``."""
    return "trainer.logger.init_args.save_dir" if trainer.loggers else "trainer.default_root_dir"


def check_fit_outputs(trainer: L.Trainer, export_dir: str | None, ckpt_path: str | None, export_option: str = "model.export_dir") -> None:
    """Before the first training step: the log dir, checkpoint folders and export folder can be written, and the export clobbers nothing.

    Checked on global rank 0 (which writes the export; several ranks creating and removing the same
    folder would race) and the verdict broadcast, so every rank stops together rather than some waiting.
    """
    log_dir = trainer.log_dir or trainer.default_root_dir  # trainer.log_dir is a collective under DDP: every rank asks
    target = resolve_export_dir(export_dir, trainer)
    problem = None
    if trainer.is_global_zero:
        try:
            _check_fit_outputs(trainer, log_dir, target, export_dir, ckpt_path, export_option)
        except ConfigError as err:
            problem = str(err)
    problem = trainer.strategy.broadcast(problem)
    if problem:
        raise ConfigError(problem)


def _check_fit_outputs(trainer: L.Trainer, log_dir: str, target: Path | None, export_dir: str | None, ckpt_path: str | None,
                       export_option: str) -> None:
    if _is_local(log_dir):
        check_writable(Path(log_dir), log_dir_option(trainer))
    ckpt_dirs = checkpoint_dirs(trainer)
    for folder in ckpt_dirs:
        check_writable(folder, "trainer.callbacks: ModelCheckpoint dirpath")
    if target is not None and _is_local(export_dir or log_dir):
        check_export_dir(target, export_option, ckpt_path, ckpt_dirs)
