"""StepTimer times every training batch of a real fit, logs it every step and writes it as JSON."""

import json

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from l3m_lightning.callbacks import StepTimer


class _LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("steps_seen", float(batch_idx))
        return out


def test_step_timer_logs_and_writes_every_batch(tmp_path, single_thread):
    timer = StepTimer(output_path=str(tmp_path / "times.json"), record=["steps_seen", "never_logged"])
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=50, callbacks=[timer],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(_LoggingModel())
    saved = json.loads((tmp_path / "times.json").read_text())
    assert len(saved["step_s"]) == 4 and len(saved["interval_s"]) == 3 and saved["global_step"] == [0, 1, 2, 3]
    assert saved["median_step_s"] is not None
    assert saved["metrics"] == {"steps_seen": [0.0, 1.0, 2.0, 3.0], "never_logged": [None] * 4}
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged_steps = [int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("time/step_s")]]
    assert logged_steps == [0, 1, 2, 3]  # every batch, although log_every_n_steps is 50
