"""The relaxed log-barrier B_μ, its derivative and the μ schedule (method.md §2-§3).

Everything is float64 and checked against closed forms; no test relies on the implementation
under test to produce its own expected value.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from l3m_lightning.barrier import MuSchedule, relaxed_log_barrier, relaxed_log_barrier_grad

F64 = torch.float64
MUS = [1.0, 0.5, 0.1, 0.03, 0.01, 1e-3]


def t64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F64)


def ref_barrier(z: float, mu: float) -> float:
    """B_μ(z) written straight from method.md §2, in plain Python floats."""
    if z <= -mu * mu:
        return -mu * math.log(-z)
    return z / mu - mu * math.log(mu * mu) + mu


def ref_grad(z: float, mu: float) -> float:
    return mu / (-z) if z <= -mu * mu else 1.0 / mu


def grid(mu: float, *, avoid_kink: float = 0.0) -> torch.Tensor:
    """Sorted float64 points spanning both branches, dense around the kink z = -μ²."""
    s = mu * mu
    pts = np.concatenate(
        [
            -s * np.geomspace(1.0 + 1e-3, 1e4, 60),  # log branch, from just past the kink outwards
            -s * np.linspace(0.0, 0.999, 25),  # linear branch between the kink and 0
            np.linspace(-3.0, 3.0, 121),
            np.geomspace(1e-6, 1e3, 30),
        ]
    )
    pts = np.unique(pts)
    if avoid_kink:
        pts = pts[np.abs(pts + s) > avoid_kink * s]
    return t64(pts)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(
    "z, mu, expected",
    [
        (-0.5, 0.1, -0.1 * math.log(0.5)),  # log branch: -μ log(-z)
        (-2.0, 1.0, -math.log(2.0)),  # log branch can be negative
        (-1.0, 1.0, 0.0),  # exactly at the kink z = -μ² = -1
        (2.0, 0.5, 2.0 / 0.5 - 0.5 * math.log(0.25) + 0.5),  # linear branch
        (0.0, 0.1, -0.1 * math.log(0.01) + 0.1),  # linear branch at the boundary z = 0
        (-0.005, 0.1, -0.005 / 0.1 - 0.1 * math.log(0.01) + 0.1),  # linear branch, z in (-μ², 0)
    ],
)
def test_barrier_closed_form_values(z, mu, expected):
    got = relaxed_log_barrier(t64(z), mu)
    assert got.dtype == F64
    assert got.item() == pytest.approx(expected, rel=1e-14, abs=1e-15)
    # a plain Python float works too and is computed in float64
    got_float = relaxed_log_barrier(z, mu)
    assert got_float.dtype == F64
    assert got_float.item() == pytest.approx(expected, rel=1e-14, abs=1e-15)


@pytest.mark.parametrize(
    "z, mu, expected",
    [
        (-0.5, 0.1, 0.2),  # μ/(-z)
        (-4.0, 2.0, 0.5),
        (-0.01, 0.1, 10.0),  # at the kink both forms give 1/μ
        (-0.005, 0.1, 10.0),  # violated-side of the kink: 1/μ
        (2.0, 0.5, 2.0),  # 1/μ
        (0.0, 0.25, 4.0),
    ],
)
def test_barrier_grad_closed_form_values(z, mu, expected):
    got = relaxed_log_barrier_grad(t64(z), mu)
    assert got.item() == pytest.approx(expected, rel=1e-14)
    assert relaxed_log_barrier_grad(z, mu).item() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize("mu", MUS)
def test_barrier_vectorised_matches_reference(mu):
    z = grid(mu)
    got_b = relaxed_log_barrier(z, mu)
    got_g = relaxed_log_barrier_grad(z, mu)
    assert got_b.shape == z.shape and got_g.shape == z.shape
    exp_b = t64([ref_barrier(v, mu) for v in z.tolist()])
    exp_g = t64([ref_grad(v, mu) for v in z.tolist()])
    torch.testing.assert_close(got_b, exp_b, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(got_g, exp_g, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- derivative


@pytest.mark.parametrize("mu", MUS)
def test_autograd_of_barrier_equals_grad_function(mu):
    z = grid(mu).requires_grad_(True)
    relaxed_log_barrier(z, mu).sum().backward()
    expected = relaxed_log_barrier_grad(z.detach(), mu)
    torch.testing.assert_close(z.grad, expected, rtol=1e-12, atol=0.0)
    # and both equal the textbook derivative
    torch.testing.assert_close(expected, t64([ref_grad(v, mu) for v in z.detach().tolist()]), rtol=1e-13, atol=0.0)


@pytest.mark.parametrize("mu", MUS)
def test_grad_matches_central_finite_differences(mu):
    # keep every stencil on one side of the kink: points at least 1e-3·μ² away from it, h ≤ 1e-5·scale
    z = grid(mu, avoid_kink=1e-3)
    h = 1e-6 * torch.maximum(z.abs(), t64(mu * mu))
    fd = (relaxed_log_barrier(z + h, mu) - relaxed_log_barrier(z - h, mu)) / (2 * h)
    torch.testing.assert_close(fd, relaxed_log_barrier_grad(z, mu), rtol=1e-6, atol=0.0)


# --------------------------------------------------------------------------- smoothness at the kink


@pytest.mark.parametrize("mu", [1.0, 0.5, 0.1, 0.03, 0.01])
def test_value_and_derivative_continuous_at_kink(mu):
    eps = 1e-9
    s = mu * mu
    below, at, above = t64(-s - eps), t64(-s), t64(-s + eps)  # log side, kink, linear side
    b_lo, b_at, b_hi = (relaxed_log_barrier(v, mu).item() for v in (below, at, above))
    g_lo, g_at, g_hi = (relaxed_log_barrier_grad(v, mu).item() for v in (below, at, above))
    # |ΔB| ≤ sup|B'|·eps = eps/μ on each side; a wrong constant in the linear branch would jump by ~μ
    assert abs(b_hi - b_lo) <= 2 * eps / mu + 1e-13
    assert abs(b_at - b_lo) <= 2 * eps / mu + 1e-13
    assert b_at == pytest.approx(-mu * math.log(s), rel=1e-13, abs=1e-15)
    # the linear branch extrapolated to the kink has the log branch's value there
    assert b_hi - eps / mu == pytest.approx(b_at, rel=1e-9, abs=1e-12)
    # B'' on the log side at the kink is μ/s² = 1/μ³, so |ΔB'| ≤ 2·eps/μ³; the slope itself is 1/μ
    assert abs(g_hi - g_lo) <= 2 * eps / mu**3 + 1e-12
    assert g_at == pytest.approx(1.0 / mu, rel=1e-14)
    assert g_hi == pytest.approx(1.0 / mu, rel=1e-14)
    assert g_lo == pytest.approx(1.0 / mu, rel=2 * eps / s)


# --------------------------------------------------------------------------- numerical safety


@pytest.mark.parametrize("mu", [1.0, 0.1, 1e-3])
def test_finite_values_and_gradients_for_extreme_inputs(mu):
    z = t64([1e30, -1e30, 1e300, -1e300, 0.0, -0.0, -(mu * mu), 1e-300, -1e-300]).requires_grad_(True)
    b = relaxed_log_barrier(z, mu)
    assert torch.isfinite(b).all(), b
    b.sum().backward()
    assert torch.isfinite(z.grad).all(), z.grad
    assert (z.grad >= 0).all()
    g = relaxed_log_barrier_grad(z.detach(), mu)
    assert torch.isfinite(g).all() and (g >= 0).all() and (g <= 1.0 / mu * (1 + 1e-15)).all()
    torch.testing.assert_close(z.grad, g, rtol=1e-12, atol=0.0)
    # huge violations: linear branch, value z/μ + const, slope exactly 1/μ
    assert b[0].item() == pytest.approx(1e30 / mu, rel=1e-12)
    assert g[0].item() == 1.0 / mu and g[2].item() == 1.0 / mu
    # huge slack: -μ log(1e30), slope μ/1e30
    assert b[1].item() == pytest.approx(-mu * math.log(1e30), rel=1e-12)
    assert g[1].item() == pytest.approx(mu / 1e30, rel=1e-12)
    # z = 0 is on the linear branch: the classic log barrier would be +inf there
    assert b[4].item() == pytest.approx(-mu * math.log(mu * mu) + mu, rel=1e-13)
    assert g[4].item() == 1.0 / mu


def test_infinite_inputs_give_no_nan():
    # ±inf is outside "finite everywhere" (B(+inf) = +inf is the right limit), but nothing may turn into NaN,
    # in particular not the gradient of the branch that torch.where discards
    z = t64([math.inf, -math.inf]).requires_grad_(True)
    b = relaxed_log_barrier(z, 0.1)
    assert not torch.isnan(b).any()
    assert b[0].item() == math.inf
    b[0].backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad[0].item() == pytest.approx(10.0)
    g = relaxed_log_barrier_grad(z.detach(), 0.1)
    assert not torch.isnan(g).any()
    assert g[0].item() == pytest.approx(10.0) and g[1].item() == 0.0


def test_float32_input_keeps_dtype_and_is_finite():
    z = torch.tensor([-0.5, 0.0, 3.0, 1e30], dtype=torch.float32)
    b = relaxed_log_barrier(z, 0.1)
    g = relaxed_log_barrier_grad(z, 0.1)
    assert b.dtype == torch.float32 and g.dtype == torch.float32
    assert torch.isfinite(b).all() and torch.isfinite(g).all()
    torch.testing.assert_close(b[:3].double(), t64([ref_barrier(v, 0.1) for v in (-0.5, 0.0, 3.0)]), rtol=1e-6, atol=1e-6)


def test_integer_tensor_input_is_promoted_not_truncated():
    # B'(z) = 1/μ = 3.33… for violated z; an integer z must not truncate it to 3 (B itself was always right)
    z = torch.tensor([1, -2, 0])
    torch.testing.assert_close(relaxed_log_barrier_grad(z, 0.3), relaxed_log_barrier_grad(z.to(F64), 0.3), rtol=1e-15, atol=0)
    torch.testing.assert_close(relaxed_log_barrier(z, 0.3), relaxed_log_barrier(z.to(F64), 0.3), rtol=1e-15, atol=0)
    assert relaxed_log_barrier_grad(torch.tensor(5), 0.3).item() == pytest.approx(1 / 0.3, rel=1e-15)


# --------------------------------------------------------------------------- shape


@pytest.mark.parametrize("mu", MUS)
def test_increasing_and_convex_on_grid(mu):
    z = grid(mu)
    b = relaxed_log_barrier(z, mu)
    dz = z[1:] - z[:-1]
    slopes = (b[1:] - b[:-1]) / dz
    assert (slopes > 0).all(), "B_mu must be strictly increasing"
    # convex ⇔ secant slopes non-decreasing along a sorted grid (works for a non-uniform grid)
    tol = 1e-9 * slopes.abs().max()
    assert (slopes[1:] - slopes[:-1] >= -tol).all(), "B_mu must be convex"
    # and on a uniform grid, second differences are non-negative
    u = torch.linspace(-2.0, 2.0, 4001, dtype=F64)
    bu = relaxed_log_barrier(u, mu)
    second = bu[2:] - 2 * bu[1:-1] + bu[:-2]
    assert (second >= -1e-12 * bu.abs().max()).all()
    # the derivative is positive, bounded by 1/μ and non-decreasing
    g = relaxed_log_barrier_grad(z, mu)
    assert (g > 0).all() and (g <= 1.0 / mu * (1 + 1e-15)).all()
    assert (g[1:] >= g[:-1] * (1 - 1e-15)).all()


def test_linear_branch_is_strictly_convex_only_on_log_side():
    # sanity of the grid test: the function is affine on the violated side (zero second difference)
    mu = 0.1
    u = torch.linspace(0.0, 1.0, 101, dtype=F64)
    b = relaxed_log_barrier(u, mu)
    torch.testing.assert_close(b[2:] - 2 * b[1:-1] + b[:-2], torch.zeros(99, dtype=F64), rtol=0, atol=1e-12)
    v = torch.linspace(-1.0, -0.1, 101, dtype=F64)
    bv = relaxed_log_barrier(v, mu)
    assert ((bv[2:] - 2 * bv[1:-1] + bv[:-2]) > 0).all()


# --------------------------------------------------------------------------- μ → 0


@pytest.mark.parametrize("z", [-0.5, -0.01, -1e-3, -3.0])
def test_feasible_side_tends_to_zero(z):
    mus = [10.0**-k for k in range(1, 10)]
    vals = [relaxed_log_barrier(t64(z), m).item() for m in mus if m * m < -z]
    grads = [relaxed_log_barrier_grad(t64(z), m).item() for m in mus if m * m < -z]
    assert len(vals) >= 5
    mags = [abs(v) for v in vals]
    assert all(a > b for a, b in zip(mags, mags[1:])), mags  # strictly shrinking
    assert mags[-1] < 1e-7
    assert all(a > b for a, b in zip(grads, grads[1:]))
    assert grads[-1] == pytest.approx(1e-9 / -z, rel=1e-12)  # B' = μ/(-z) → 0 on the feasible side


@pytest.mark.parametrize("z", [1e-4, 0.01, 1.0, 5.0])
def test_violated_side_grows_without_bound(z):
    mus = [10.0**-k for k in range(0, 10)]
    # B_μ(z) = z/μ + μ(1 - log μ²) is not monotone in μ for large μ, but is once μ ≤ 0.1·min(z, 1)
    small = [m for m in mus if m <= 0.1 * min(z, 1.0)]
    vals = [relaxed_log_barrier(t64(z), m).item() for m in small]
    assert len(vals) >= 4
    assert all(b > a for a, b in zip(vals, vals[1:])), vals  # strictly growing as μ shrinks
    for bound in (1e2, 1e4, 1e8):
        mu = z / bound
        assert relaxed_log_barrier(t64(z), mu).item() >= bound  # B ≥ z/μ on the violated side
    for m in mus:
        assert relaxed_log_barrier_grad(t64(z), m).item() == 1.0 / m  # slope exactly 1/μ when violated


def test_boundary_point_tends_to_zero():
    # the indicator of {z ≤ 0} is 0 at z = 0, and B_μ(0) = μ(1 - log μ²) → 0
    vals = [relaxed_log_barrier(t64(0.0), 10.0**-k).item() for k in range(1, 12)]
    assert all(a > b > 0 for a, b in zip(vals, vals[1:]))
    assert vals[-1] < 1e-9


# --------------------------------------------------------------------------- multipliers


@pytest.mark.parametrize("mu", MUS)
def test_complementary_slackness_identity(mu):
    s = mu * mu
    z = t64(np.concatenate([[-s], -s * np.geomspace(1.0001, 1e6, 40), -np.linspace(max(s, 0.5), 5.0, 20)]))
    z = z[z <= -s]
    # λ·(-C) = μ wherever the constraint holds with slack ≥ μ² (method.md §3, here with k = 1)
    torch.testing.assert_close(relaxed_log_barrier_grad(z, mu) * (-z), torch.full_like(z, mu), rtol=1e-14, atol=0.0)
    # between the kink and the boundary the product is below μ, and it is ≤ 0 once violated
    w = -s * t64(np.linspace(0.0, 0.99, 12)[1:])
    assert (relaxed_log_barrier_grad(w, mu) * (-w) < mu).all()
    v = t64([0.0, 0.1, 10.0])
    assert (relaxed_log_barrier_grad(v, mu) * (-v) <= 0).all()


# --------------------------------------------------------------------------- invalid μ


@pytest.mark.parametrize("fn", [relaxed_log_barrier, relaxed_log_barrier_grad])
@pytest.mark.parametrize("mu", [0.0, -0.1, -1.0, math.nan, math.inf, -math.inf])
def test_invalid_mu_raises(fn, mu):
    with pytest.raises(ValueError):
        fn(t64(-0.5), mu)


# --------------------------------------------------------------------------- μ schedule


def test_mu_schedule_exact_sequence_with_floor():
    sched = MuSchedule(start=1.0, floor=0.1, factor=0.5, every=3)
    assert sched.mu == 1.0
    got = [sched.step() for _ in range(18)]
    expected = [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125] + [0.1] * 7
    assert got == pytest.approx(expected, rel=0, abs=1e-15)
    assert sched.mu == 0.1 and sched.steps == 18
    for _ in range(100):
        assert sched.step() == 0.1  # the floor holds, exactly


def test_mu_schedule_defaults_match_method():
    sched = MuSchedule()
    assert sched.start == 1.0 and sched.floor == 0.01 and sched.mu == 1.0
    for _ in range(10_000):
        sched.step()
    assert sched.mu == 0.01


def test_mu_schedule_factor_one_is_constant():
    sched = MuSchedule(start=0.3, floor=0.01, factor=1.0, every=1)
    assert [sched.step() for _ in range(5)] == [0.3] * 5


@pytest.mark.parametrize("split", [0, 1, 2, 3, 7, 11, 14])
def test_mu_schedule_state_round_trip_continues_identically(split):
    cfg = dict(start=1.0, floor=0.1, factor=0.5, every=3)
    ref = MuSchedule(**cfg)
    full = [ref.step() for _ in range(20)]

    first = MuSchedule(**cfg)
    head = [first.step() for _ in range(split)]
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # a checkpoint, as a trainer would write it
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = MuSchedule(**cfg)
    resumed.load_state_dict(state)
    assert resumed.mu == first.mu and resumed.steps == first.steps
    tail = [resumed.step() for _ in range(20 - split)]
    assert head + tail == full


def test_mu_schedule_fresh_instance_differs_from_resumed():
    # guards the round-trip test: without load_state_dict the continuation would differ
    cfg = dict(start=1.0, floor=0.1, factor=0.5, every=3)
    a = MuSchedule(**cfg)
    for _ in range(7):
        a.step()
    b = MuSchedule(**cfg)
    assert [a.step() for _ in range(5)] != [b.step() for _ in range(5)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(start=0.5, floor=1.0),  # floor above start
        dict(factor=0.0),
        dict(factor=1.5),
        dict(factor=-0.5),
        dict(factor=math.nan),
        dict(every=0),
        dict(every=-3),
        dict(start=0.0),
        dict(start=-1.0),
        dict(start=math.nan),
        dict(floor=0.0),
        dict(floor=-0.01),
    ],
)
def test_mu_schedule_invalid_config_raises(kwargs):
    with pytest.raises(ValueError):
        MuSchedule(**kwargs)
