"""Score-function (REINFORCE) estimator of the constraint gradients (method.md §4).

A constraint value c(x, y) — a length, a reward-model score of decoded text — has no gradient
in θ, so ∇C = E[(c − β) ∇log π(y|x)] is estimated from sampled responses. These functions are
pure tensor maths so they can be checked against closed forms independently of any model.
"""

from __future__ import annotations

import torch

from l3m_lightning.barrier import relaxed_log_barrier_grad


def leave_one_out_baseline(costs: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """β_j: the mean cost of the *other* valid samples drawn for the same prompt.

    ``costs`` is flat ``[num_prompts * group_size]`` with each prompt's samples contiguous.
    Excluding the sample itself keeps the gradient unbiased. When a prompt has no other valid
    sample (``group_size == 1``, or the rest were dropped) the baseline falls back to the mean of
    all other valid samples in the batch, which is still independent of the sample itself.
    """
    if costs.dim() != 1 or costs.numel() % group_size:
        raise ValueError(f"costs must be flat with a multiple of group_size={group_size} entries, got {tuple(costs.shape)}")
    valid = torch.ones_like(costs, dtype=torch.bool) if valid is None else valid.bool()
    masked = torch.where(valid, costs, torch.zeros_like(costs))
    weight = valid.to(costs.dtype)

    group_sum = masked.view(-1, group_size).sum(dim=1, keepdim=True).expand(-1, group_size).reshape(-1)
    group_cnt = weight.view(-1, group_size).sum(dim=1, keepdim=True).expand(-1, group_size).reshape(-1)
    others_sum, others_cnt = group_sum - masked, group_cnt - weight

    batch_others_sum, batch_others_cnt = masked.sum() - masked, weight.sum() - weight
    batch_baseline = batch_others_sum / batch_others_cnt.clamp(min=1)
    group_baseline = others_sum / others_cnt.clamp(min=1)
    return torch.where(others_cnt > 0, group_baseline, batch_baseline)


def constraint_multipliers(constraint_estimates: torch.Tensor, mu: float) -> torch.Tensor:
    """λ_i = B'_μ(Ĉ_i) / k: the barrier's Lagrange multiplier estimates (method.md §3)."""
    k = constraint_estimates.numel()
    return relaxed_log_barrier_grad(constraint_estimates.detach(), mu) / max(k, 1)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid entries; 0 (not NaN) when none is valid. Invalid entries are never read, so a
    NaN/inf there (e.g. a dropped sample's log-prob) cannot leak into the mean or its gradient."""
    valid = valid.bool()
    weight = valid.to(values.dtype)
    return torch.where(valid, values, torch.zeros_like(values)).sum() / weight.sum().clamp(min=1)


def policy_gradient_surrogate(
    sequence_logprobs: torch.Tensor,
    costs: torch.Tensor,
    multipliers: torch.Tensor,
    group_size: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_i sg(λ_i) · mean_j[ sg(c_ij − β_ij) · log π(y_j|x_j) ].

    Its gradient is Σ_i λ_i ∇C_i (in expectation); its value means nothing. ``costs`` and
    ``valid`` are ``[k, N]``, ``sequence_logprobs`` is ``[N]`` (sum of the response's token
    log-probabilities), ``multipliers`` is ``[k]``. Only ``sequence_logprobs`` carries gradient.
    """
    if costs.dim() != 2 or costs.shape[1] != sequence_logprobs.shape[0]:
        raise ValueError(f"costs must be [num_constraints, {sequence_logprobs.shape[0]}], got {tuple(costs.shape)}")
    # a response is one "token" carrying its whole log-prob, with no per-token shift
    n = sequence_logprobs.shape[0]
    return token_level_surrogate(sequence_logprobs, torch.arange(n, device=sequence_logprobs.device),
                                 sequence_logprobs.new_zeros(costs.shape[0], n), costs, multipliers, group_size, valid)


def token_level_surrogate(
    token_logprobs: torch.Tensor,
    token_sequence: torch.Tensor,
    baseline_shift: torch.Tensor,
    costs: torch.Tensor,
    multipliers: torch.Tensor,
    group_size: int,
    valid: torch.Tensor | None = None,
    token_position: torch.Tensor | None = None,
    gae_lambda: float = 1.0,
) -> torch.Tensor:
    """``policy_gradient_surrogate`` with a per-token baseline β_ijt = β_ij + shift_it.

    Token t of sample j gets the advantage c_ij − β_ij − shift_it, where β_ij is the leave-one-out
    baseline and ``shift_it`` ([k, M]) may depend on the prompt and the tokens *before* t only
    (e.g. V_i(x, y_<t) − V_i(x)), so the gradient stays unbiased. With a zero shift it equals
    ``policy_gradient_surrogate`` exactly. ``token_logprobs``/``token_sequence``: [M] log π of each
    sampled token and the index of its sample. ``gae_lambda < 1`` (needs ``token_position``) replaces
    the advantages by ``generalized_advantages`` of them.
    """
    num_samples = costs.shape[1]
    valid = torch.ones_like(costs, dtype=torch.bool) if valid is None else valid.bool()
    dtype = token_logprobs.dtype
    total = token_logprobs.new_zeros(())
    for i in range(costs.shape[0]):
        c = costs[i].detach().to(dtype)
        per_sample = torch.where(valid[i], c - leave_one_out_baseline(c, group_size, valid[i]), torch.zeros_like(c))
        advantage = per_sample[token_sequence] - baseline_shift[i].detach().to(dtype)
        advantage = generalized_advantages(advantage, token_sequence, token_position, gae_lambda) * valid[i][token_sequence]
        weighted = torch.zeros(num_samples, dtype=dtype, device=token_logprobs.device).index_add(0, token_sequence, advantage.detach() * token_logprobs)
        total = total + multipliers[i].detach().to(dtype) * masked_mean(weighted, valid[i])
    return total


def generalized_advantages(advantage: torch.Tensor, token_sequence: torch.Tensor, token_position: torch.Tensor, lam: float) -> torch.Tensor:
    """GAE(λ) with γ = 1 and a terminal-only cost, from the Monte-Carlo advantages u_t = c − V_t.

    With V_t the baseline of token t, δ_t = V_{t+1} − V_t inside a response and c − V_last at its end,
    so A_t = Σ_k λ^k δ_{t+k} obeys A_last = u_last, A_t = u_t − u_{t+1} + λ·A_{t+1}. λ = 1 returns u
    (unbiased); λ < 1 credits each token mostly with the change of V it caused, not with the noise
    of everything sampled after it — less variance, biased by V's error (Schulman et al., 2016).
    ``token_position``: each token's index within its response (0, 1, … contiguous).
    """
    if lam == 1.0:
        return advantage
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"gae_lambda must be in [0, 1], got {lam}")
    if token_position is None:
        raise ValueError("gae_lambda < 1 needs token_position")
    length = int(token_position.max()) + 1 if token_position.numel() else 0
    dense = advantage.new_zeros(int(token_sequence.max()) + 1 if token_sequence.numel() else 0, length + 1)
    present = torch.zeros_like(dense, dtype=torch.bool)
    dense[token_sequence, token_position] = advantage
    present[token_sequence, token_position] = True
    out = torch.zeros_like(dense)
    for t in reversed(range(length)):
        following = lam * out[:, t + 1] - dense[:, t + 1]
        out[:, t] = dense[:, t] + torch.where(present[:, t + 1], following, torch.zeros_like(following))
    return out[token_sequence, token_position]


class ExponentialMovingAverage:
    """Optional smoothing of Ĉ_i before λ_i is read off (our option, not the paper's; off by default).

    B' of a noisy minibatch estimate is biased near the boundary; an EMA trades that bias for lag.
    ``decay = 0`` disables it (the estimate passes through unchanged).
    """

    def __init__(self, decay: float = 0.0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"model.multipliers.ema must be in [0, 1), got {decay}")
        self.decay = decay
        self.value: torch.Tensor | None = None

    def update(self, estimate: torch.Tensor) -> torch.Tensor:
        estimate = estimate.detach()
        if self.decay == 0.0:
            return estimate
        if self.value is None or self.value.shape != estimate.shape:
            self.value = estimate.clone()
        else:
            self.value = self.decay * self.value.to(estimate) + (1 - self.decay) * estimate
        return self.value

    def state_dict(self) -> dict:
        return {"decay": self.decay, "value": None if self.value is None else self.value.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.value = state.get("value")
