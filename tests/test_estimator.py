"""The score-function estimator of the constraint gradients (method.md §4), on a categorical policy.

The "policy" is a softmax over n = 5 responses with known lengths ℓ; a constraint "E_π[ℓ] ≤ L" has
per-response costs c_j = (ℓ_j − L)/scale. For logits θ, ∇_θ E_π[c] = π ⊙ (c − π·c) in closed form,
so the estimator's expectation can be checked exactly (by enumerating every possible group of
samples) and statistically (by Monte Carlo).
"""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from l3m_lightning.barrier import relaxed_log_barrier_grad
from l3m_lightning.estimator import (
    ExponentialMovingAverage,
    constraint_multipliers,
    leave_one_out_baseline,
    masked_mean,
    policy_gradient_surrogate,
)

F64 = torch.float64
LENGTHS = torch.tensor([2.0, 5.0, 9.0, 14.0, 20.0], dtype=F64)
SCALE = 10.0


def t64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F64)


def costs_at_most(limit: float) -> torch.Tensor:
    return (LENGTHS - limit) / SCALE


def costs_at_least(limit: float) -> torch.Tensor:
    return (limit - LENGTHS) / SCALE


def random_logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LENGTHS.numel(), generator=g, dtype=F64)


def closed_form_grad(theta: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """∇_θ Σ_j softmax(θ)_j c_j = π ⊙ (c − π·c)."""
    pi = torch.softmax(theta, 0)
    return pi * (c - (pi * c).sum())


def surrogate_grad(theta, idx, costs_k, multipliers, group_size, valid=None) -> torch.Tensor:
    """Autograd gradient w.r.t. θ of the library's surrogate for sampled response indices ``idx``."""
    theta = theta.detach().clone().requires_grad_(True)
    logprobs = torch.log_softmax(theta, 0)[idx]
    loss = policy_gradient_surrogate(logprobs, costs_k, multipliers, group_size=group_size, valid=valid)
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


# --------------------------------------------------------------------------- the closed form itself


def test_closed_form_constraint_gradient_matches_autograd():
    theta = random_logits(0).requires_grad_(True)
    c = costs_at_most(8.0)
    (auto,) = torch.autograd.grad((torch.softmax(theta, 0) * c).sum(), theta)
    torch.testing.assert_close(auto, closed_form_grad(theta.detach(), c), rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- leave-one-out baseline


def test_leave_one_out_baseline_hand_values():
    costs = t64([1.0, 2.0, 4.0, 10.0, 20.0, 30.0])
    got = leave_one_out_baseline(costs, group_size=3)
    expected = t64([3.0, 2.5, 1.5, 25.0, 20.0, 15.0])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)


def test_leave_one_out_baseline_with_mask_and_batch_fallback():
    costs = t64([1.0, 2.0, 4.0, 10.0, 20.0, 30.0, 7.0, 8.0, 9.0])
    valid = torch.tensor([True, True, False, True, False, False, True, True, True])
    got = leave_one_out_baseline(costs, group_size=3, valid=valid)
    # group 0: the dropped 4.0 is ignored; group 1: sample 3 is alone, so it falls back to the mean of
    # every *other valid* sample in the batch: (1 + 2 + 7 + 8 + 9)/5 = 5.4; group 2: ordinary LOO
    expected = {0: 2.0, 1: 1.0, 3: 5.4, 6: 8.5, 7: 8.0, 8: 7.5}
    for j, v in expected.items():
        assert got[j].item() == pytest.approx(v, abs=1e-14), (j, got)
    assert torch.isfinite(got).all()


def test_leave_one_out_baseline_group_size_one_is_batch_leave_one_out():
    costs = t64([1.0, 2.0, 3.0, 10.0])
    got = leave_one_out_baseline(costs, group_size=1)
    torch.testing.assert_close(got, t64([15.0, 14.0, 13.0, 6.0]) / 3, rtol=0, atol=1e-14)
    valid = torch.tensor([True, True, False, True])
    got = leave_one_out_baseline(costs, group_size=1, valid=valid)
    for j, v in {0: 6.0, 1: 5.5, 3: 1.5}.items():
        assert got[j].item() == pytest.approx(v, abs=1e-14)


def test_leave_one_out_baseline_never_uses_own_cost():
    g = torch.Generator().manual_seed(1)
    costs = torch.randn(12, generator=g, dtype=F64)
    for k in (1, 2, 3, 4):
        base = leave_one_out_baseline(costs, group_size=k)
        for j in range(costs.numel()):
            bumped = costs.clone()
            bumped[j] += 1000.0
            assert leave_one_out_baseline(bumped, group_size=k)[j].item() == pytest.approx(base[j].item(), abs=1e-12)


def test_leave_one_out_baseline_lonely_sample_is_finite():
    # a single valid sample in the whole batch has no other sample to average: no NaN from 0/0
    got = leave_one_out_baseline(t64([5.0, 7.0]), group_size=1, valid=torch.tensor([True, False]))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("costs, k", [(torch.zeros(5, dtype=F64), 3), (torch.zeros(2, 3, dtype=F64), 3)])
def test_leave_one_out_baseline_rejects_bad_shapes(costs, k):
    with pytest.raises(ValueError):
        leave_one_out_baseline(costs, group_size=k)


def test_surrogate_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        policy_gradient_surrogate(torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64), t64([1.0]), group_size=2)
    with pytest.raises(ValueError):
        policy_gradient_surrogate(torch.zeros(4, dtype=F64), torch.zeros(1, 6, dtype=F64), t64([1.0]), group_size=2)


# --------------------------------------------------------------------------- exact unbiasedness


@pytest.mark.parametrize(
    "group_size, num_groups",
    [(2, 1), (3, 1), (1, 2), (1, 3)],  # LOO within a prompt's group; batch fallback when K = 1
)
@pytest.mark.parametrize("num_constraints", [1, 2])
def test_surrogate_gradient_is_exactly_unbiased(group_size, num_groups, num_constraints):
    """E over every possible sample tuple of ∇(surrogate) = Σ_i λ_i ∇_θ E_π[c_i], to rounding error."""
    theta = random_logits(3)
    pi = torch.softmax(theta, 0)
    n, m = theta.numel(), group_size * num_groups
    cost_table = torch.stack([costs_at_most(8.0), costs_at_least(12.0)])[:num_constraints]
    lam = t64([0.7, 0.3])[:num_constraints]

    expected = sum(lam[i] * closed_form_grad(theta, cost_table[i]) for i in range(num_constraints))
    total = torch.zeros(n, dtype=F64)
    prob_mass = 0.0
    for tup in itertools.product(range(n), repeat=m):
        idx = torch.tensor(tup)
        weight = pi[idx].prod()
        total += weight * surrogate_grad(theta, idx, cost_table[:, idx], lam, group_size)
        prob_mass += weight.item()
    assert prob_mass == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-12)
    assert expected.abs().max() > 1e-2  # the target is not trivially zero


def test_exact_expectation_detects_a_biased_baseline():
    """Control for the test above: a baseline that includes the sample's own cost is biased, and the
    same enumeration notices."""
    theta = random_logits(3)
    pi = torch.softmax(theta, 0)
    c = costs_at_most(8.0)
    total = torch.zeros(5, dtype=F64)
    for a, b in itertools.product(range(5), repeat=2):
        idx = torch.tensor([a, b])
        th = theta.clone().requires_grad_(True)
        lp = torch.log_softmax(th, 0)[idx]
        adv = c[idx] - c[idx].mean()  # own cost inside the baseline
        (g,) = torch.autograd.grad((adv * lp).mean(), th)
        total += pi[a] * pi[b] * g
    assert (total - closed_form_grad(theta, c)).abs().max() > 1e-3


# --------------------------------------------------------------------------- Monte Carlo and variance


def per_group_gradients(theta, idx, c, lam, group_size, baseline: bool) -> torch.Tensor:
    """[G, n]: each group's contribution λ·mean_{j∈g}(c_j − β_j)(e_{y_j} − π), computed by hand."""
    pi = torch.softmax(theta, 0)
    costs = c[idx]
    beta = leave_one_out_baseline(costs, group_size) if baseline else torch.zeros_like(costs)
    score = torch.nn.functional.one_hot(idx, theta.numel()).to(F64) - pi  # ∇_θ log π(y_j)
    per_sample = lam * (costs - beta)[:, None] * score
    return per_sample.view(-1, group_size, theta.numel()).mean(dim=1)


def test_monte_carlo_gradient_and_baseline_variance_reduction():
    theta = random_logits(5)
    # a strongly violated "length ≥ 25" constraint: every cost is in [0.5, 2.3], a large common offset,
    # the regime a baseline is for (with costs centred on 0, LOO over K samples costs a factor K/(K−1))
    c = costs_at_least(25.0)
    lam = 0.8
    group_size, num_groups = 4, 20_000
    gen = torch.Generator().manual_seed(1234)
    idx = torch.multinomial(torch.softmax(theta, 0), group_size * num_groups, replacement=True, generator=gen)

    g_loo = per_group_gradients(theta, idx, c, lam, group_size, baseline=True)
    g_none = per_group_gradients(theta, idx, c, lam, group_size, baseline=False)
    # the hand-computed per-group gradients average to exactly the library's autograd gradient
    lib = surrogate_grad(theta, idx, c[idx][None], t64([lam]), group_size)
    torch.testing.assert_close(g_loo.mean(0), lib, rtol=1e-10, atol=1e-13)

    target = lam * closed_form_grad(theta, c)
    for g in (g_loo, g_none):
        se = g.std(0) / math.sqrt(num_groups)
        z = (g.mean(0) - target) / se
        assert z.abs().max() < 5.0, z  # unbiased within 5 standard errors, per component

    var_loo = g_loo.var(0).sum().item()
    var_none = g_none.var(0).sum().item()
    assert var_loo < 0.4 * var_none, (var_loo, var_none)  # measured: 0.058 vs 0.280


def test_surrogate_gradient_is_invariant_to_a_constant_cost_offset():
    """With a leave-one-out baseline, c → c + b changes no sample's advantage (exactly, per sample)."""
    theta = random_logits(7)
    gen = torch.Generator().manual_seed(0)
    for group_size in (1, 2, 4):
        idx = torch.multinomial(torch.softmax(theta, 0), 8, replacement=True, generator=gen)
        c = costs_at_most(9.0)
        g0 = surrogate_grad(theta, idx, c[idx][None], t64([1.3]), group_size)
        g1 = surrogate_grad(theta, idx, (c[idx] + 37.0)[None], t64([1.3]), group_size)
        torch.testing.assert_close(g0, g1, rtol=1e-10, atol=1e-12)


def test_surrogate_gradient_scales_with_multiplier_and_flows_only_through_logprobs():
    theta = random_logits(8)
    idx = torch.tensor([0, 3, 4, 4, 1, 2])
    c = costs_at_most(8.0)[idx][None].clone().requires_grad_(True)
    lam = t64([0.5]).requires_grad_(True)
    logprobs = torch.log_softmax(theta, 0)[idx].clone().requires_grad_(True)
    loss = policy_gradient_surrogate(logprobs, c, lam, group_size=2)
    g_lp, g_c, g_lam = torch.autograd.grad(loss, [logprobs, c, lam], allow_unused=True)
    assert g_c is None and g_lam is None  # sg(c − β) and sg(λ)
    # d loss / d log π(y_j) = λ (c_j − β_j) / N
    cj = c.detach()[0]
    beta = leave_one_out_baseline(cj, 2)
    torch.testing.assert_close(g_lp, 0.5 * (cj - beta) / 6, rtol=1e-13, atol=1e-15)
    g2 = surrogate_grad(theta, idx, c.detach(), t64([1.5]), 2)
    g1 = surrogate_grad(theta, idx, c.detach(), t64([0.5]), 2)
    torch.testing.assert_close(g2, 3 * g1, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- multipliers


def test_constraint_multipliers_two_constraints():
    estimates = t64([0.3, -0.2]).requires_grad_(True)
    mu = 0.1
    lam = constraint_multipliers(estimates, mu)
    assert not lam.requires_grad and lam.grad_fn is None
    torch.testing.assert_close(lam, relaxed_log_barrier_grad(estimates.detach(), mu) / 2, rtol=1e-15, atol=0)
    # closed form: B'(0.3) = 1/μ = 10 (violated), B'(−0.2) = μ/0.2 = 0.5; each divided by k = 2
    torch.testing.assert_close(lam, t64([5.0, 0.25]), rtol=1e-14, atol=0)


def test_constraint_multipliers_single_constraint_and_slackness():
    mu = 0.05
    for C in (-0.9, -0.3, -0.01, -mu * mu):
        lam = constraint_multipliers(t64([C]), mu)
        assert lam.shape == (1,)
        assert lam.item() * (-C) == pytest.approx(mu, rel=1e-13)  # λ·(−C) = μ/k with k = 1
    for C in (-0.3, -0.01):
        lam2 = constraint_multipliers(t64([C, C]), mu)
        assert (lam2 * (-C)).tolist() == pytest.approx([mu / 2, mu / 2], rel=1e-13)  # = μ/k with k = 2
    assert constraint_multipliers(t64([1e30]), mu).item() == pytest.approx(1 / mu)


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("bad_cost", [1e6, -1e6, math.inf, math.nan])
def test_masked_samples_do_not_affect_the_gradient(bad_cost):
    theta = random_logits(11)
    idx = torch.tensor([0, 4, 2, 1, 3, 3, 2, 0, 4])
    cost_table = torch.stack([costs_at_most(8.0), costs_at_least(12.0)])
    costs = cost_table[:, idx].clone()
    valid = torch.ones_like(costs, dtype=torch.bool)
    valid[:, 1] = False  # a dropped sample in a group of 3 ...
    valid[0, 5] = False  # ... and one dropped for constraint 0 only
    lam = t64([0.9, 0.4])
    ref = surrogate_grad(theta, idx, costs, lam, 3, valid)
    poisoned = costs.clone()
    poisoned[:, 1] = bad_cost
    poisoned[0, 5] = bad_cost
    got = surrogate_grad(theta, idx, poisoned, lam, 3, valid)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # and the mask is not a no-op: poisoning a *valid* sample does change the gradient
    if math.isfinite(bad_cost):
        poisoned_valid = costs.clone()
        poisoned_valid[:, 2] = bad_cost
        assert (surrogate_grad(theta, idx, poisoned_valid, lam, 3, valid) - ref).abs().max() > 1.0


def test_masked_sample_equals_removed_sample_when_group_size_one():
    theta = random_logits(12)
    idx = torch.tensor([1, 4, 0, 2, 4, 3])
    c = costs_at_most(8.0)
    valid = torch.tensor([[True, True, False, True, True, True]])
    got = surrogate_grad(theta, idx, c[idx][None], t64([1.0]), 1, valid)
    keep = valid[0]
    ref = surrogate_grad(theta, idx[keep], c[idx[keep]][None], t64([1.0]), 1)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("bad_logprob", [-math.inf, math.nan])
def test_masked_sample_with_non_finite_logprob_is_ignored(bad_logprob):
    # a dropped sample's log-prob (e.g. of an empty or truncated response) must not turn the loss into NaN
    theta = random_logits(13)
    idx = torch.tensor([0, 4, 2, 1])
    c = costs_at_most(8.0)[idx][None]
    valid = torch.tensor([[True, False, True, True]])
    th = theta.clone().requires_grad_(True)
    lp = torch.log_softmax(th, 0)[idx]
    ref_loss = policy_gradient_surrogate(lp, c, t64([1.0]), 2, valid)
    (ref,) = torch.autograd.grad(ref_loss, th)
    th2 = theta.clone().requires_grad_(True)
    lp2 = torch.log_softmax(th2, 0)[idx]
    lp2 = torch.where(torch.arange(4) == 1, torch.full_like(lp2, bad_logprob), lp2)
    loss = policy_gradient_surrogate(lp2, c, t64([1.0]), 2, valid)
    (got,) = torch.autograd.grad(loss, th2)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref_loss.item(), rel=1e-14)
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-16)


def test_masked_mean():
    v = t64([1.0, 2.0, 100.0, 4.0])
    assert masked_mean(v, torch.tensor([True, True, False, True])).item() == pytest.approx(7.0 / 3)
    assert masked_mean(v, torch.zeros(4, dtype=torch.bool)).item() == 0.0
    for bad in (math.nan, math.inf, -math.inf):
        w = t64([1.0, 2.0, bad, 4.0])
        assert masked_mean(w, torch.tensor([True, True, False, True])).item() == pytest.approx(7.0 / 3)


# --------------------------------------------------------------------------- EMA option


def test_ema_decay_zero_passes_through():
    ema = ExponentialMovingAverage(0.0)
    for x in ([0.5, -1.0], [3.0, 2.0], [-7.0, 0.0]):
        est = t64(x).requires_grad_(True)
        out = ema.update(est)
        assert not out.requires_grad
        torch.testing.assert_close(out, t64(x), rtol=0, atol=0)


def test_ema_decay_half_exact_values():
    ema = ExponentialMovingAverage(0.5)
    outs = [ema.update(t64([x, -x])).clone() for x in (1.0, 3.0, 5.0, -1.0)]
    expected = [1.0, 2.0, 3.5, 1.25]  # first value seeds the average, then v ← ½v + ½x
    for o, e in zip(outs, expected):
        torch.testing.assert_close(o, t64([e, -e]), rtol=0, atol=1e-15)


def test_ema_state_round_trip():
    a = ExponentialMovingAverage(0.8)
    for x in (0.4, -0.2, 0.1):
        a.update(t64([x]))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = ExponentialMovingAverage(0.8)
    b.load_state_dict(torch.load(buf, weights_only=True))
    fresh = ExponentialMovingAverage(0.8)  # what a resume without the state would do
    for x in (0.3, -0.5, 0.0):
        expected = a.update(t64([x]))
        torch.testing.assert_close(b.update(t64([x])), expected, rtol=0, atol=0)
        assert fresh.update(t64([x])).item() != pytest.approx(expected.item())
    # a state saved before any update resumes as "no value yet"
    c = ExponentialMovingAverage(0.8)
    c.load_state_dict(ExponentialMovingAverage(0.8).state_dict())
    assert c.update(t64([2.0])).item() == 2.0


def test_ema_asymmetric_decay_weights_the_history():
    # decay 0.5 cannot tell v ← d·v + (1−d)·x from v ← (1−d)·v + d·x; 0.75 can
    ema = ExponentialMovingAverage(0.75)
    outs = [ema.update(t64([x])).item() for x in (1.0, 3.0, 5.0)]
    assert outs == [1.0, 1.5, 2.375]


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, math.nan])
def test_ema_invalid_decay_raises(decay):
    with pytest.raises(ValueError):
        ExponentialMovingAverage(decay)
