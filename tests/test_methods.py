"""The baselines on the categorical toy of tests/toy_problem.py: lagrangian (MM) and penalty."""

import pytest
import torch

from l3m_lightning.multipliers import MultiplierRule
from toy_problem import CASES, F64, LENGTHS, kkt_solution, run_toy


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def run(rule: MultiplierRule, c: torch.Tensor, seed: int = 0, steps: int = 600, samples: int = 8192):
    """Final π and the per-step multipliers [steps] of the one constraint c, λ from ``rule`` (μ is not used)."""
    pi, lams = run_toy([c], lambda c_hat: rule(c_hat, mu=1.0), seed, steps=steps, samples=samples)
    return pi, lams[:, 0]


@pytest.mark.parametrize("case", ["at_most", "at_least"])
def test_lagrangian_reaches_kkt_point_and_true_multiplier(case):
    c, limit, _ = CASES[case]
    lam_star, pi_star = kkt_solution(c)
    pi, lams = run(MultiplierRule("lagrangian", 1, dual_lr=0.05), c)
    assert (pi - pi_star).abs().max().item() < 0.02
    assert (pi @ LENGTHS).item() == pytest.approx(limit, abs=0.3)
    assert lams[-100:].mean().item() == pytest.approx(lam_star, rel=0.1)


def test_penalty_with_the_true_multiplier_reaches_the_kkt_point_and_a_wrong_weight_does_not():
    c, limit, _ = CASES["at_most"]
    lam_star, pi_star = kkt_solution(c)
    pi, lams = run(MultiplierRule("penalty", 1, penalty_weights=[lam_star]), c)
    assert (lams == lam_star).all()
    assert (pi - pi_star).abs().max().item() < 0.02
    weak, _ = run(MultiplierRule("penalty", 1, penalty_weights=[lam_star / 4]), c)
    assert (weak @ LENGTHS).item() > limit + 0.5  # too small a weight leaves the constraint violated


def test_rule_state_round_trip_and_config_errors():
    rule = MultiplierRule("lagrangian", 2, dual_lr=0.5, dual_init=[0.0, 1.0])
    out = rule(torch.tensor([0.2, -4.0], dtype=F64), mu=1.0)
    assert out.tolist() == pytest.approx([0.1, 0.0])  # projected onto λ ≥ 0
    fresh = MultiplierRule("lagrangian", 2, dual_lr=0.5)
    fresh.load_state_dict(rule.state_dict())
    assert fresh.lambdas.tolist() == pytest.approx([0.1, 0.0])
    with pytest.raises(ValueError, match="trained with method 'lagrangian'"):
        MultiplierRule("barrier", 2).load_state_dict(rule.state_dict())
    with pytest.raises(ValueError, match="model.multipliers.method must be one of barrier, lagrangian, penalty"):
        MultiplierRule("mm", 1)
    with pytest.raises(ValueError, match="model.multipliers.penalty_weights is required"):
        MultiplierRule("penalty", 1)
    with pytest.raises(ValueError, match=r"model.multipliers.penalty_weights needs one value per constraint \(2\)"):
        MultiplierRule("penalty", 2, penalty_weights=[1.0])
