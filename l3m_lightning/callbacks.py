"""Callbacks the module brings along: predictions to JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes each ``predict`` batch's ``{prompt, completion, num_tokens}`` rows to JSONL as they come.

    Default file: ``<log dir>/predictions.jsonl`` (``predictions.rank<N>.jsonl`` on more than one process).
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self._file = None

    def _path(self, trainer: L.Trainer) -> Path:
        if self.output_path:
            path = Path(self.output_path)
        else:
            path = Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")

    def write_on_batch_end(self, trainer, pl_module, prediction: list[dict[str, Any]], batch_indices, batch, batch_idx, dataloader_idx) -> None:
        for row in prediction:
            self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
