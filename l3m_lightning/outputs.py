"""Where a run's exported Hugging Face folder goes (shared by the policy and reward-model modules)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L


def resolve_export_dir(export_dir: str | None, trainer: L.Trainer) -> Path | None:
    """``""`` disables export; ``None`` means ``<log dir>/hf_model``; anything else is the folder."""
    if export_dir == "":
        return None
    if export_dir:
        return Path(export_dir)
    return Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"


def save_pretrained_atomically(target: Path, model: Any, tokenizer: Any, **model_kwargs: Any) -> None:
    """``save_pretrained`` into a sibling temp folder, then swap it in: a crash never leaves half a model."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, **model_kwargs)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
