"""A learned per-token baseline: V_i(x, y_<t), the expected cost of constraint i given a prefix.

The leave-one-out baseline is one number per response, so every token of a long sampled response
carries the response's whole advantage: a response that is long *because its first token chose a
verbose answer* pushes down all of its content tokens too. That is noise — in expectation it
cancels — but it is most of the policy-gradient variance on long responses, and it costs task
loss (measured on the embedded data in experiments/length_table.py).

Subtracting V_i(x, y_<t) − V_i(x) as well leaves the gradient unbiased (it does not depend on
token t) and removes what the prefix already determines: once a verbose answer has started, its
remaining length is nearly known, so its content tokens get advantage ≈ 0 while the token that
chose it keeps the full signal. V is a linear read-out of the policy's last hidden state (detached:
the baseline never shapes the policy's features) and the token's position in the response,
fitted by least squares to the sampled responses' costs. Zero-initialised, so training starts
exactly at the leave-one-out estimator.
"""

from __future__ import annotations

import torch

from l3m_lightning.estimator import masked_mean
from l3m_lightning.logprobs import TokenLogprobs


class TokenValueHead(torch.nn.Module):
    """``width = 0``: linear in the features; otherwise one hidden layer of that width."""

    def __init__(self, hidden_size: int, num_constraints: int, max_new_tokens: int, width: int = 0) -> None:
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.num_features = hidden_size + 1  # the policy's last hidden state and the token's position
        self.body = torch.nn.Sequential(torch.nn.Linear(self.num_features, width), torch.nn.GELU()) if width else torch.nn.Identity()
        self.linear = torch.nn.Linear(width or self.num_features, num_constraints)
        torch.nn.init.zeros_(self.linear.weight)  # V = 0 at the start: exactly the leave-one-out estimator
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: TokenLogprobs | None = None) -> torch.Tensor:
        """V for every scored token ``[k, M]``: the state it was sampled from and its position.

        ``None``: V of one all-zero feature row, for steps without samples (constraint warm-up) —
        ``0 · head()`` keeps the head in the graph, as DDP and FSDP expect of every parameter.
        """
        if tokens is None:
            return self.linear(self.body(self.linear.weight.new_zeros(1, self.num_features))).T
        position = tokens.positions().to(self.linear.weight.dtype) / self.max_new_tokens
        features = torch.cat([tokens.hidden.detach().to(self.linear.weight.dtype), position.unsqueeze(1)], dim=1)
        return self.linear(self.body(features)).T

    @staticmethod
    def baseline_shift(values: torch.Tensor, tokens: TokenLogprobs) -> torch.Tensor:
        """V(x, y_<t) − V(x) per token ``[k, M]`` (detached): what the prefix adds to the expected cost."""
        first = tokens.first_token()[tokens.sequence]
        return (values - values[:, first]).detach()

    @staticmethod
    def loss(values: torch.Tensor, tokens: TokenLogprobs, costs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mean squared error of V against each token's response cost, over valid samples' tokens."""
        target, used = _token_targets(tokens, costs, valid, values.dtype)
        return masked_mean((values - target) ** 2, used)

    @staticmethod
    def explained_variance(mse: torch.Tensor, tokens: TokenLogprobs, costs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """1 − MSE / Var(cost) over the same tokens, clipped to [−1, 1]: 0 = no better than a constant, 1 = perfect."""
        target, used = _token_targets(tokens, costs, valid, mse.dtype)
        variance = masked_mean((target - masked_mean(target, used)) ** 2, used)
        # clipped: when the sampled costs hardly vary (e.g. every sample hit max_new_tokens) the ratio explodes
        return (1 - mse.detach() / variance.clamp(min=1e-12)).clamp(-1.0, 1.0).float()


def _token_targets(tokens: TokenLogprobs, costs: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's response cost ``[k, M]`` (detached) and whether that response is valid."""
    return costs.detach().to(dtype)[:, tokens.sequence], valid[:, tokens.sequence]
