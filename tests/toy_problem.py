"""Shared test fixtures that are not tests: the categorical toy constrained problem and a two-row chat batch.

The toy (test_convergence.py, test_methods.py). Policy: a softmax over n = 5 responses with lengths ℓ.
Task loss: the cross entropy to a data distribution p, L(θ) = −Σ_j p_j log π_θ(j) (exact and
differentiable). Constraint: E_π[ℓ] ≤ L_max (or ≥ L_min), active at the optimum. KKT stationarity
(π − p) + λ π ⊙ (c − π·c) = 0 with π·c = 0 gives

    π*_j = p_j / (1 + λ* c_j),     λ* > 0 solving Σ_j p_j / (1 + λ* c_j) = 1,

for the normalised costs c_j = (ℓ_j − L_max)/scale, so λ* is the multiplier in the same units as the
library's λ = B'_μ(Ĉ)/k. The "at least" direction is the same with c_j = (L_min − ℓ_j)/scale.

``run_toy`` is the one training loop: each step samples responses from π_θ, reads λ off the sampled Ĉ
with the given rule (never from the true C), and steps Adam on CE + the score-function surrogate,
with gradients clipped at norm 1 as in the paper and a cosine learning-rate decay to 10%.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from scipy.optimize import brentq

from l3m_lightning.data import ChatCollator, tokenize_messages
from l3m_lightning.estimator import policy_gradient_surrogate

F64 = torch.float64
P_DATA = torch.tensor([0.10, 0.20, 0.30, 0.25, 0.15], dtype=F64)
LENGTHS = torch.tensor([2.0, 5.0, 9.0, 14.0, 20.0], dtype=F64)
SCALE = 10.0
UNCONSTRAINED_MEAN = float(P_DATA @ LENGTHS)  # 10.4
GROUP = 2  # K: responses sampled per prompt

CASES = {
    # name: (costs, L, direction sign: +1 "at most", −1 "at least")
    "at_most": ((LENGTHS - 8.0) / SCALE, 8.0, +1),
    "at_least": ((13.0 - LENGTHS) / SCALE, 13.0, -1),
}


def kkt_solution(c: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(λ*, π*) for min CE(p, π) s.t. π·c ≤ 0, active at the optimum."""
    p, cn = P_DATA.numpy(), c.numpy()
    assert p @ cn > 0, "the constraint must be violated by the unconstrained solution p"
    f = lambda lam: float((p / (1.0 + lam * cn)).sum() - 1.0)  # noqa: E731
    # f(0) = 0, f'(0) = −p·c < 0 and f → +∞ as the smallest denominator → 0, so one root in between
    upper = 1.0 / (-cn.min())
    lam = brentq(f, 1e-9 * upper, upper * (1 - 1e-12), xtol=1e-15, rtol=1e-15)
    pi = torch.tensor(p / (1.0 + lam * cn), dtype=F64)
    assert (1.0 + lam * cn > 0).all()
    return lam, pi


def cross_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    return -(P_DATA * logprobs).sum()


def run_toy(
    cost_rows: Sequence[torch.Tensor],
    multipliers: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
    *,
    steps: int,
    samples: int,
    sign: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train the toy policy; returns the final π and the per-step multipliers [steps, k].

    ``multipliers(Ĉ)`` maps the step's minibatch estimates [k] to λ [k] (a stateful rule steps itself);
    ``samples`` is the number of prompts per step, each with ``GROUP`` responses; ``sign`` −1 flips the
    surrogate (a control that must not converge).
    """
    costs = torch.stack(list(cost_rows))  # [k, n]
    gen = torch.Generator().manual_seed(seed)
    theta = torch.zeros(LENGTHS.numel(), dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.02)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / steps)))
    lams = []
    for _ in range(steps):
        logprobs = torch.log_softmax(theta, 0)
        with torch.no_grad():
            idx = torch.multinomial(logprobs.exp(), samples * GROUP, replacement=True, generator=gen)
        sample_costs = costs[:, idx]  # [k, N], the K samples of each prompt contiguous
        lam = multipliers(sample_costs.mean(dim=1))  # from the minibatch estimate of C_i(θ)
        assert lam.shape == (costs.shape[0],) and not lam.requires_grad
        surrogate = policy_gradient_surrogate(logprobs.gather(0, idx), sample_costs, lam, group_size=GROUP)
        loss = cross_entropy(logprobs) + sign * surrogate
        opt.zero_grad()
        loss.backward()
        # clip at norm 1, as the paper does: a step whose Ĉ lands on the violated side reads λ = 1/μ, and
        # without clipping that one kick inflates Adam's second moment for ~1/(1−β2) steps
        torch.nn.utils.clip_grad_norm_([theta], max_norm=1.0)
        opt.step()
        lr_sched.step()
        lams.append(lam.clone())  # a stateful rule may hand back its own state
    return torch.softmax(theta.detach(), 0), torch.stack(lams)


# --------------------------------------------------------------------------- a chat batch for L3MModule

CHAT_PAIRS = (("What is 2 plus 2?", "4."), ("Name a colour.", "Red is a colour that many flags use."))


def chat_batch(tokenizer, pairs: Sequence[tuple[str, str]] = CHAT_PAIRS, max_tokens: int = 64) -> dict:
    """A collated batch of single-turn chats (question, answer), as ChatDataModule yields them."""
    rows = []
    for q, a in pairs:
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({**tokenize_messages(tokenizer, messages, max_tokens, max_tokens), "prompt_text": q, "response_text": a})
    return ChatCollator(tokenizer.pad_token_id)(rows)


TINY_POLICY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


def tiny_module(policy: dict | None = None, sampling: dict | None = None, **kwargs: Any):
    """An ``L3MModule`` on a one-layer embedded policy, 4 new tokens per sample, no Trainer (logging off);
    groups as mappings (``barrier={"mu_start": 0.5}``)."""
    from l3m_lightning.module import L3MModule

    module = L3MModule(policy={"config": TINY_POLICY, **(policy or {})}, sampling={"max_new_tokens": 4, **(sampling or {})}, **kwargs)
    module.log = module.log_dict = lambda *a, **k: None
    return module
