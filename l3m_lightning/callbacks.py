"""Callbacks: predictions to JSONL (the module brings it along) and per-step wall time (``StepTimer``)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback


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


class StepTimer(Callback):
    """Wall time of every training batch of the real fit loop, logged as ``time/step_s`` and optionally written as JSON.

    ``step_s``: from ``on_train_batch_start`` to ``on_train_batch_end`` — sampling, forward, objective,
    backward and the optimiser step (one optimiser step per batch without gradient accumulation).
    ``interval_s``: from one batch start to the next, so it also holds what runs between batches
    (fetching and collating the next batch, logging, checkpoint and validation callbacks); batch
    ``i``'s interval ends at batch ``i + 1``'s start, so the last batch has none.

    Both go to the loggers every batch (``time/step_s``, ``time/interval_s``, at the step Lightning logs
    that batch's metrics at), whatever ``trainer.log_every_n_steps`` says. On CUDA the device is
    synchronised at both ends, so queued kernels count in the step they belong to.

    Args:
        output_path: if given, global rank 0 writes ``{"step_s": [...], "interval_s": [...], "global_step": [...],
            "median_step_s": ..., "metrics": {...}}`` there at the end of ``fit``.
        record: names of metrics the module logs every step (e.g. ``completions/mean_length``),
            copied per batch into the JSON's ``metrics`` (read after the batch's time is taken).

    Command line: ``--trainer.callbacks+=l3m_lightning.callbacks.StepTimer --trainer.callbacks.output_path=times.json``,
    or in a config ``{class_path: l3m_lightning.callbacks.StepTimer, init_args: {output_path: times.json}}``.
    """

    def __init__(self, output_path: str | None = None, record: list[str] | None = None) -> None:
        super().__init__()
        self.output_path = output_path
        self.record = list(record or [])
        self.step_s: list[float] = []
        self.interval_s: list[float] = []
        self.global_step: list[int] = []
        self.metrics: dict[str, list[float | None]] = {name: [] for name in self.record}
        self._start: float | None = None

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        now = time.perf_counter()
        if self._start is not None:  # the previous batch's start to this one's
            self.interval_s.append(now - self._start)
            self._log(trainer, {"time/interval_s": self.interval_s[-1]}, self.global_step[-1])
        self._start = now
        self.global_step.append(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        assert self._start is not None
        self.step_s.append(time.perf_counter() - self._start)
        self._log(trainer, {"time/step_s": self.step_s[-1]}, self.global_step[-1])
        logged = trainer.callback_metrics
        for name in self.record:
            value = logged.get(name)
            self.metrics[name].append(None if value is None else float(value))

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        """To every logger at once; ``step`` is the global step at the batch's start, the step Lightning logs that batch's own metrics at."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.output_path or not trainer.is_global_zero:
            return
        path = Path(self.output_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary(), indent=1))

    def summary(self) -> dict[str, Any]:
        """The per-batch times (and recorded metrics) so far, with their median."""
        return {"step_s": self.step_s, "interval_s": self.interval_s, "global_step": self.global_step,
                "median_step_s": statistics.median(self.step_s) if self.step_s else None, "metrics": self.metrics}
