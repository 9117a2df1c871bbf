"""The statistics experiments/compare_methods.py reports, on hand-made series and a real event file."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import runlib  # noqa: E402


def test_first_feasible_step_is_one_based():
    assert runlib.first_feasible_step([0, 1, 2, 3], [0.5, 0.1, -0.2, 0.3]) == 3
    assert runlib.first_feasible_step([0, 1], [0.5, 0.1]) is None


def test_oscillation_counts_reversals_and_skips_flat_steps():
    osc = runlib.oscillation([1.0, 2.0, 1.0, 1.0, 2.0, 3.0, 2.0])
    assert osc["sign_changes"] == 3  # up, down, (flat), up, up, down
    assert osc["mean"] == pytest.approx(12 / 7)
    assert runlib.oscillation([0.5] * 10) == {"mean": 0.5, "std": 0.0, "sign_changes": 0}


def test_training_stats_from_event_file(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for step, (value, lam) in enumerate([(1.0, 1.0), (0.5, 1.5), (-0.1, 1.2), (0.2, 1.4), (-0.3, 1.1), (-0.2, 1.3)]):
        writer.add_scalar(runlib.VALUE, value, step)
        writer.add_scalar(runlib.LAMBDA, lam, step)
        writer.add_scalar(runlib.SATISFIED, float(value <= 0), step)
        writer.add_scalar(runlib.LENGTH, 10 + 10 * value, step)
    writer.close()
    stats = runlib.training_stats(tmp_path, max_steps=6)
    assert stats["first_feasible_step"] == 3
    assert stats["feasible_fraction_last_half"] == pytest.approx(2 / 3)  # steps 3, 4, 5
    assert stats["lambda_last_half"]["sign_changes"] == 1  # steps 3-5: 1.4 -> 1.1 -> 1.3
    assert stats["lambda_last_half"]["steps"] == 3
