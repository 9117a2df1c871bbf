"""A lean sampling loop: each prompt prefilled once, its KV cache shared by its K samples.

``transformers.generate`` with ``num_return_sequences=K`` copies every prompt K times before the
prefill, so each prompt runs through the model K times; its cache grows by ``torch.cat`` (the
whole cache copied at every token); and ``torch.multinomial`` draws a token with one exponential
variate per vocabulary entry (12.7 ms a step for 16 rows of a 49k vocabulary on 2 CPU cores,
longer than a 135M model's forward). This loop prefills the B prompts once, repeats their cache
K-fold, writes new keys/values into reserved room, and draws each token by inverting the CDF with
one uniform per row.

The distribution sampled is generate's: the logits pass through transformers' own min-new-tokens,
temperature, top-k and top-p processors in generate's order; finished rows get the pad token; the
loop ends when every row has stopped. ``exact_draw=True`` draws with ``torch.multinomial`` as
generate does, and then the same seed gives the same tokens as ``generate`` whenever the logits
agree bitwise (``tests/test_decoding.py`` checks both: token-for-token equality with the exact
draw, and the inverse-CDF draw's frequencies against the probabilities).

``lean_decoding_supported`` says whether a model can take this path; ``sampling.sample_rollouts``
falls back to ``generate`` for the rest (encoder-decoders, forwards without a cache, position ids or
``logits_to_keep``) and for lock-step decoding across ranks under FSDP1.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList, MinNewTokensLengthLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)


def cache_argument(model: PreTrainedModel) -> str | None:
    """The forward's name for the KV cache (``cache`` from transformers 5.x on, ``past_key_values`` before), if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes keyword arguments through
    params = inspect.signature(base.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def lean_decoding_supported(model: PreTrainedModel) -> bool:
    """A decoder-only model whose forward takes a cache, position ids and ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or cache_argument(model) is None:
        return False
    params = inspect.signature(base.forward).parameters
    return "position_ids" in params and "logits_to_keep" in params


def logits_processors(temperature: float, top_k: int, top_p: float, min_new_tokens: int = 0, stop_token_ids: list[int] = (),
                      prompt_length: int = 0, device: torch.device | str = "cpu") -> LogitsProcessorList:
    """The processors ``generate`` applies when sampling, in its order (none when they are the identity).

    They read the sequence so far only for its length (min-new-tokens): pass ``[N, prompt_length + step]``-shaped ids.
    """
    warpers = LogitsProcessorList()
    if min_new_tokens:
        warpers.append(MinNewTokensLengthLogitsProcessor(prompt_length, min_new_tokens, list(stop_token_ids), device=str(device)))
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` that, once ``reserve``d, writes new keys/values into spare room instead of concatenating.

    ``DynamicLayer.update`` copies the whole cache at every token (``torch.cat``): quadratic in the
    response length, and a third of a small model's decode step. Past ``reserve`` the cache is a
    view of one preallocated buffer, as in fast inference engines.
    """

    def reserve(self, extra_tokens: int) -> None:
        """Room for ``extra_tokens`` more positions (after the prefill and the K-fold repeat)."""
        length = self.keys.shape[-2]
        for name in ("keys", "values"):
            old = getattr(self, name)
            buffer = old.new_empty(*old.shape[:-2], length + extra_tokens, old.shape[-1])
            buffer[..., :length, :] = old
            setattr(self, f"_{name}_buffer", buffer)
            setattr(self, name, buffer[..., :length, :])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self, "_keys_buffer", None) is None:
            return super().update(key_states, value_states, *args, **kwargs)
        start, stop = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        self._keys_buffer[..., start:stop, :] = key_states
        self._values_buffer[..., start:stop, :] = value_states
        self.keys, self.values = self._keys_buffer[..., :stop, :], self._values_buffer[..., :stop, :]
        return self.keys, self.values


def reserved_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers can ``reserve`` room (others stay as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def inverse_cdf_draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` ``[N, V]`` (rows summing to ~1), from one uniform per row.

    The CDF is summed in float64, so rounding cannot move mass between tokens; a token of
    probability 0 is never drawn (also when the uniform lands on the very end of the CDF).
    """
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(1)
    last_possible = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(token, last_possible)


@torch.no_grad()
def lean_sample(
    model: PreTrainedModel,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    num_samples: int,
    max_new_tokens: int,
    stop_token_ids: list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    exact_draw: bool = False,
) -> torch.Tensor:
    """``[B*K, T]`` new tokens (samples of one prompt contiguous), pad after a row's stop token, ``T <= max_new_tokens``.

    Prompts are left-padded; positions count real tokens only, as in ``generate``. ``exact_draw``:
    ``torch.multinomial`` (generate's draw, bit for bit) instead of the inverse-CDF draw.
    """
    k = num_samples
    mask = prompt_attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = reserved_cache(model.config)
    with_cache = {cache_argument(model): cache, "use_cache": True}
    logits = model(input_ids=prompt_input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **with_cache).logits[:, -1].float()
    if k > 1:  # the prompt's cache, its last logits and its mask, once per sample
        cache.batch_repeat_interleave(k)
        logits, mask = logits.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
    for layer in cache.layers:
        if isinstance(layer, ReservedLayer):
            layer.reserve(max_new_tokens)
    next_position = positions[:, -1:].repeat_interleave(k, dim=0) + 1
    prompt_length = prompt_input_ids.shape[1]
    processors = logits_processors(temperature, top_k, top_p, min_new_tokens, stop_token_ids, prompt_length, logits.device)
    # the processors read the sequence so far for its length only: a view of the right shape will do
    length_only = torch.empty(logits.shape[0], prompt_length + max_new_tokens, dtype=torch.long, device=logits.device)
    stops = torch.tensor(stop_token_ids, device=logits.device)
    unfinished = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        scores = processors(length_only[:, : prompt_length + step], logits) if processors else logits
        probs = torch.softmax(scores, dim=-1)
        token = torch.multinomial(probs, num_samples=1).squeeze(1) if exact_draw else inverse_cdf_draw(probs)
        token = torch.where(unfinished, token, pad_token_id)
        tokens.append(token)
        unfinished &= ~torch.isin(token, stops)
        if step == max_new_tokens - 1 or not unfinished.any():
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position, **with_cache).logits[:, -1].float()
        next_position = next_position + 1
    return torch.stack(tokens, dim=1)
