"""The per-token baseline: unbiased for any prefix-only shift (exact enumeration), lower variance with
the true value function, identical to the leave-one-out estimator when the shift is zero. GAE(λ):
unbiased with the true value for any λ and less variance on the choosing token, biased with a wrong one.

Toy policy over two-token responses: the first token chooses an answer kind (concise or verbose),
the second its wording. Costs are lengths, set almost entirely by the kind — the situation in which
the response-level baseline puts noise on the wording tokens.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from l3m_lightning.estimator import generalized_advantages, policy_gradient_surrogate, token_level_surrogate
from l3m_lightning.logprobs import TokenLogprobs
from l3m_lightning.value_baseline import TokenValueHead

F64 = torch.float64
LENGTHS = torch.tensor([[2.0, 3.0, 2.5], [20.0, 22.0, 21.0]], dtype=F64)  # [kind, wording]
COSTS = (LENGTHS - 8.0) / 10.0
RESPONSES = list(itertools.product(range(2), range(3)))


def _policy(theta_kind, theta_word):
    return torch.log_softmax(theta_kind, 0), torch.log_softmax(theta_word, 1)


def _params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64)


def _exact_gradient(theta_kind, theta_word):
    tk, tw = theta_kind.clone().requires_grad_(True), theta_word.clone().requires_grad_(True)
    lk, lw = _policy(tk, tw)
    expected_cost = sum((lk[a] + lw[a, w]).exp() * COSTS[a, w] for a, w in RESPONSES)
    return torch.cat([g.flatten() for g in torch.autograd.grad(expected_cost, (tk, tw))])


def _estimate(theta_kind, theta_word, group, shift_fn, lam=1.0, gae=1.0):
    """Gradient of the token-level surrogate for one group of sampled responses."""
    tk, tw = theta_kind.clone().requires_grad_(True), theta_word.clone().requires_grad_(True)
    lk, lw = _policy(tk, tw)
    logp = torch.stack([x for a, w in group for x in (lk[a], lw[a, w])])
    sequence = torch.arange(len(group)).repeat_interleave(2)
    shift = torch.tensor([[s for a, w in group for s in (0.0, shift_fn(a, w))]], dtype=F64)
    costs = torch.stack([COSTS[a, w] for a, w in group]).unsqueeze(0)
    position = torch.tensor([0, 1]).repeat(len(group))
    loss = token_level_surrogate(logp, sequence, shift, costs, torch.tensor([lam], dtype=F64), group_size=len(group),
                                 token_position=position, gae_lambda=gae)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, (tk, tw))])


def _moments(theta_kind, theta_word, shift_fn, k=2, gae=1.0):
    """Exact mean and total variance of the estimate over every group of k samples."""
    lk, lw = _policy(theta_kind, theta_word)
    prob = {r: (lk[r[0]] + lw[r]).exp() for r in RESPONSES}
    mean, second = 0.0, 0.0
    for group in itertools.product(RESPONSES, repeat=k):
        p = torch.stack([prob[r] for r in group]).prod()
        g = _estimate(theta_kind, theta_word, list(group), shift_fn, gae=gae)
        mean = mean + p * g
        second = second + p * g.pow(2)
    return mean, second - mean.pow(2)


def _true_value_shift(theta_kind, theta_word):
    """V(kind) − V(prompt): what knowing the kind adds to the expected cost."""
    lk, lw = _policy(theta_kind, theta_word)
    v_kind = (lw.exp() * COSTS).sum(1)
    v_prompt = (lk.exp() * v_kind).sum()
    return lambda a, w: float(v_kind[a] - v_prompt)


@pytest.mark.parametrize("seed", [0, 1])
def test_any_prefix_only_shift_keeps_the_gradient_exactly_unbiased(seed):
    theta = _params(seed)
    exact = _exact_gradient(*theta)
    for shift in (lambda a, w: 0.0, lambda a, w: [0.3, -5.0][a], _true_value_shift(*theta)):
        mean, _ = _moments(*theta, shift)
        torch.testing.assert_close(mean, exact, rtol=1e-10, atol=1e-12)


def test_a_shift_that_peeks_at_the_token_is_biased():
    theta = _params(0)
    mean, _ = _moments(*theta, lambda a, w: 2.0 * w)  # depends on the very token it scores
    assert (mean - _exact_gradient(*theta)).abs().max() > 1e-3


def test_the_true_value_cuts_the_variance_on_the_wording_and_leaves_the_choice_alone():
    theta = _params(0)
    _, loo_only = _moments(*theta, lambda a, w: 0.0)
    _, with_value = _moments(*theta, _true_value_shift(*theta))
    kind, wording, verbose_wording = slice(0, 2), slice(2, 8), slice(5, 8)  # θ_kind, θ_word (concise row, verbose row)
    torch.testing.assert_close(with_value[kind], loo_only[kind])  # the first token keeps its advantage
    assert with_value[wording].sum() < 0.5 * loo_only[wording].sum(), (with_value, loo_only)
    # the verbose wording barely changes the cost: nearly all of its variance was the kind's advantage
    assert with_value[verbose_wording].sum() < 0.2 * loo_only[verbose_wording].sum(), (with_value, loo_only)


def test_zero_shift_equals_the_response_level_surrogate_with_dropped_samples():
    g = torch.Generator().manual_seed(3)
    counts = [3, 1, 4, 2, 5, 2]
    sequence = torch.arange(6).repeat_interleave(torch.tensor(counts))
    logp = torch.randn(len(sequence), generator=g, dtype=F64, requires_grad=True)
    costs = torch.randn(2, 6, generator=g, dtype=F64)
    valid = torch.tensor([[True, True, False, True, True, True], [True, True, True, True, False, False]])
    lam = torch.tensor([0.7, 2.0], dtype=F64)
    token = token_level_surrogate(logp, sequence, torch.zeros(2, len(sequence), dtype=F64), costs, lam, 3, valid)
    sums = torch.zeros(6, dtype=F64).index_add(0, sequence, logp)
    response = policy_gradient_surrogate(sums, costs, lam, 3, valid)
    torch.testing.assert_close(token, response)
    torch.testing.assert_close(*[torch.autograd.grad(x, logp, retain_graph=True)[0] for x in (token, response)])


@pytest.mark.parametrize("width", [0, 32])
def test_value_head_starts_at_zero_shift_and_fits_the_costs(width):
    torch.manual_seed(0)
    sequence = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    hidden = torch.randn(9, 16)  # more features than tokens: an exact fit exists
    tokens = TokenLogprobs(torch.zeros(9), sequence, 3, hidden)
    head = TokenValueHead(hidden_size=16, num_constraints=1, max_new_tokens=8, width=width)
    costs, valid = torch.tensor([[1.0, -2.0, 0.5]]), torch.ones(1, 3, dtype=torch.bool)
    values = head(tokens)
    assert values.shape == (1, 9) and torch.equal(head.baseline_shift(values, tokens), torch.zeros(1, 9))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    start = head.loss(head(tokens), tokens, costs, valid).item()
    for _ in range(300):
        optimizer.zero_grad()
        head.loss(head(tokens), tokens, costs, valid).backward()
        optimizer.step()
    assert head.loss(head(tokens), tokens, costs, valid).item() < 0.01 * start
    shift = head.baseline_shift(head(tokens), tokens)
    assert shift[0, [0, 3, 5]].abs().max() == 0  # a response's first token keeps the leave-one-out baseline


def test_explained_variance_is_clipped_when_the_costs_do_not_vary():
    tokens = TokenLogprobs(torch.zeros(4), torch.tensor([0, 0, 1, 1]), 2, torch.zeros(4, 3))
    costs, valid = torch.full((1, 2), 5.4), torch.ones(1, 2, dtype=torch.bool)  # every sample cut at max_new_tokens
    assert TokenValueHead.explained_variance(torch.tensor(29.16), tokens, costs, valid).item() == -1.0
    varied = torch.tensor([[1.0, 3.0]])  # variance 1 over the tokens
    assert TokenValueHead.explained_variance(torch.tensor(0.25), tokens, varied, valid).item() == pytest.approx(0.75)


@pytest.mark.parametrize("gae", [0.0, 0.5])
def test_gae_with_the_true_value_is_unbiased_and_quiets_the_choosing_token(gae):
    theta = _params(0)
    true_value = _true_value_shift(*theta)
    mean, variance = _moments(*theta, true_value, gae=gae)
    torch.testing.assert_close(mean, _exact_gradient(*theta), rtol=1e-10, atol=1e-12)
    _, monte_carlo = _moments(*theta, true_value)
    kind, wording = slice(0, 2), slice(2, 8)
    assert variance[kind].sum() < 0.9 * monte_carlo[kind].sum(), (variance, monte_carlo)  # no wording noise on the choice
    torch.testing.assert_close(variance[wording], monte_carlo[wording])  # the last token's advantage is unchanged


def test_gae_with_a_wrong_value_is_biased():
    theta = _params(0)
    wrong_value = lambda a, w: [0.3, -5.0][a]  # a prefix-only shift: unbiased at λ = 1, not below
    mean, _ = _moments(*theta, wrong_value, gae=0.5)
    assert (mean - _exact_gradient(*theta)).abs().max() > 1e-2


def test_generalized_advantages_are_the_discounted_sums_of_td_errors_in_any_token_order():
    g = torch.Generator().manual_seed(0)
    lengths, lam = [3, 1, 5, 2], 0.7
    sequence = torch.arange(4).repeat_interleave(torch.tensor(lengths))
    position = torch.cat([torch.arange(n) for n in lengths])
    cost = torch.randn(4, generator=g, dtype=F64)
    value = torch.randn(len(sequence), generator=g, dtype=F64)  # V'_t of each token
    expected = torch.empty_like(value)
    for j in range(4):
        v = value[sequence == j]
        td = torch.cat([v[1:] - v[:-1], (cost[j] - v[-1:])])  # V_{t+1} − V_t, then c − V_last
        expected[sequence == j] = torch.stack([sum(lam**k * td[t + k] for k in range(len(v) - t)) for t in range(len(v))])
    order = torch.randperm(len(sequence), generator=g)  # packing may interleave sequences
    monte_carlo = cost[sequence] - value
    got = generalized_advantages(monte_carlo[order], sequence[order], position[order], lam)
    torch.testing.assert_close(got, expected[order])
    assert torch.equal(generalized_advantages(monte_carlo, sequence, position, 1.0), monte_carlo)
    with pytest.raises(ValueError, match="gae_lambda must be in"):
        generalized_advantages(monte_carlo, sequence, position, 1.5)
