"""Where a run's exported Hugging Face folder goes (shared by the policy and reward-model modules)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def resolve_export_dir(export_dir: str | None, trainer: L.Trainer) -> Path | None:
    """``""`` disables export; ``None`` means ``<log dir>/hf_model``; anything else is the folder."""
    if export_dir == "":
        return None
    if export_dir:
        return Path(export_dir)
    return Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"
