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


@pytest.mark.slow
def test_token_gap_splits_the_extra_nll_into_disjoint_parts():
    import token_gap

    def row(nll, first=False, last=False, p_eos=0.0):
        return {"nll": nll, "p_eos": p_eos, "first": first, "last": last, "token": "t", "context": ""}

    reference = [row(1.0, first=True), row(0.01), row(0.3), row(2.0), row(0.0, last=True)]
    constrained = [row(2.0, first=True), row(0.11, p_eos=0.2), row(0.3), row(1.0, p_eos=0.4), row(0.5, last=True)]
    result = token_gap.summarise(reference, constrained)
    gaps = {p["tokens"]: p["gap_nats"] for p in result["parts"]}
    assert gaps["first token"] == pytest.approx(1.0) and gaps["EOS"] == pytest.approx(0.5)
    assert gaps["inner, reference nll in [0, 0.05)"] == pytest.approx(0.1)
    assert gaps["inner, reference nll in [0.05, 0.5)"] == pytest.approx(0.0)
    assert gaps["inner, reference nll in [1.5, inf)"] == pytest.approx(-1.0)
    assert result["gap_nats"] == pytest.approx(sum(gaps.values())) == pytest.approx(0.6)
    assert sum(p["share"] for p in result["parts"]) == pytest.approx(1.0)
    assert result["constrained_mean_p_eos_inside"] == pytest.approx((0.2 + 0.0 + 0.4) / 3)
