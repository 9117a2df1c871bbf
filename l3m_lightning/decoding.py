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

For a plain ``LlamaForCausalLM`` (the embedded model, SmolLM2) the one-token decode steps skip the
Hugging Face forward: most of a small model's step there is per-op Python and dispatch overhead
(module calls, RMSNorm as six ops, mask building, output dataclasses). ``LlamaDecodeStep``
computes the same logits with a few ops per layer, writing into the same cache the Hugging Face
prefill filled (``llama_decode_supported`` says when; every other model keeps its own forward).

On CPU its large float32 matmuls run on oneDNN rather than ``F.linear``'s BLAS: a decode step
multiplies a few rows by every weight matrix, and for that shape, with weights streamed from memory,
oneDNN is 2.0-2.6x faster here (2 AMD EPYC cores, ``bench/decode_kernels.py``: a 49M model's
projections, SmolLM2's 49k-row output layer 12.7 -> 4.9 ms for 8 rows); for weights that sit in cache
(all of the embedded model's) its per-call overhead loses, so they keep ``F.linear``. The two kernels
round differently (~1e-6 relative), so the logits are the forward's up to float32 rounding, not
bit for bit; ``onednn=False`` keeps ``F.linear`` everywhere, as the exact draw does.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
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


def logits_processors(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """The warpers ``generate`` applies when sampling, in its order (none when they are the identity).

    They do not read the sequence so far. ``generate``'s min-new-tokens processor comes before them;
    ``lean_sample`` applies it as one masking op (the Hugging Face one builds a vocabulary mask at every token).
    """
    warpers = LogitsProcessorList()
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

    def reserve(self, extra_tokens: int, zeroed: bool = False) -> None:
        """Room for ``extra_tokens`` more positions (after the prefill and the K-fold repeat).

        ``zeroed``: the room holds zeros, not whatever the memory held, for a fixed-window step (``FixedWindowDecode``)
        that reads the unwritten room masked: a masked NaN still poisons attention (its weight 0 times NaN).
        """
        length = self.keys.shape[-2]
        for name in ("keys", "values"):
            old = getattr(self, name)
            shape = (*old.shape[:-2], length + extra_tokens, old.shape[-1])
            buffer = old.new_zeros(shape) if zeroed else old.new_empty(shape)
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

    def write_at(self, slot: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This token's keys/values at position ``slot`` (a one-element tensor) of the reserved room; all the room back.

        Fixed shapes at every step (``FixedWindowDecode``): positions not written yet are masked by the caller.
        """
        self._keys_buffer.index_copy_(-2, slot, key_states)
        self._values_buffer.index_copy_(-2, slot, value_states)
        return self._keys_buffer, self._values_buffer


def reserved_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers can ``reserve`` room (others stay as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _unwrapped_class(model: torch.nn.Module) -> type:
    """The model's class, seen through the class FSDP2's ``fully_shard`` swaps in (``FSDPLlamaForCausalLM``)."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return cls
    return next(base for base in cls.__bases__ if base is not FSDPModule) if issubclass(cls, FSDPModule) else cls


def llama_decode_supported(model: PreTrainedModel) -> bool:
    """Whether ``LlamaDecodeStep`` computes what ``model``'s own forward would.

    Only a plain ``LlamaForCausalLM`` (also under FSDP2 once its parameters are gathered) in eval
    mode: PEFT adapters, quantized layers, accelerate's offloading hooks and sharded (DTensor)
    parameters change what the forward does. SiLU, no sliding window, SDPA attention (what the
    step runs), float32 or bfloat16.
    """
    if _unwrapped_class(model).__name__ != "LlamaForCausalLM" or model.training:
        return False
    config = model.config
    if (config.hidden_act != "silu" or getattr(config, "sliding_window", None) is not None
            or getattr(config, "pretraining_tp", 1) != 1 or config._attn_implementation != "sdpa"):
        return False
    if model.dtype not in (torch.float32, torch.bfloat16) or any(type(p.data) is not torch.Tensor for p in model.parameters()):
        return False
    if any(hasattr(m, "_hf_hook") for m in model.modules()):  # accelerate offloading moves weights in its hooks
        return False
    layers = model.model.layers[: config.num_hidden_layers]
    linears = [model.lm_head] + [p for layer in layers for p in (*_attention_projections(layer), *_mlp_projections(layer))]
    return all(type(linear) is torch.nn.Linear for linear in linears)


def _attention_projections(layer: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    attn = layer.self_attn
    return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj


def _mlp_projections(layer: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    return layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj


class _RMSNorm:
    """``LlamaRMSNorm``'s values: normalised in float32, cast back, then scaled (one fused op when already float32)."""

    def __init__(self, norm: torch.nn.Module) -> None:
        self.weight, self.eps = norm.weight, norm.variance_epsilon
        self.shape = tuple(self.weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.shape, eps=self.eps).to(x.dtype)


#: Weights with at least this many elements take oneDNN's matmul in the decode step (see the module docstring).
#: It sits between the embedded model's 2048x128 output layer (262,144 elements: about even, 1.01-1.16x for
#: oneDNN in ``bench/decode_kernels.py``, so it keeps ``F.linear`` and the embedded model decodes bit for bit as
#: before) and a 576x576 projection (331,776: 2.0x); small weights stay in cache, where oneDNN's per-call
#: overhead loses (128x128: 0.5-0.6x).
ONEDNN_MIN_WEIGHT_ELEMENTS = 300_000


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` computed by oneDNN's matmul (no gradient; the weight is used as it is, no copy)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _Linear:
    """One projection's live weight and bias with the matmul a decode step should use for it."""

    __slots__ = ("weight", "bias", "matmul")

    def __init__(self, linear: torch.nn.Linear, onednn: bool) -> None:
        """``onednn``: oneDNN may be used (asked for and available); it is, for a large float32 CPU weight."""
        self.weight, self.bias = linear.weight, linear.bias
        large_cpu_float32 = (self.weight.device.type == "cpu" and self.weight.dtype == torch.float32
                             and self.weight.numel() >= ONEDNN_MIN_WEIGHT_ELEMENTS)
        self.matmul: Callable = onednn_linear if onednn and large_cpu_float32 else F.linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.bias)


class _LlamaLayer:
    """One decoder layer's norms and projections, as plain attributes: no ``nn.Module`` lookups per step.

    They are the live parameters, not copies: weights fused into one matmul would have to be copied
    at every sampling call (training changes them), which costs a step's time on a 49M model and
    doubles its weights' memory, for no measurable gain per step (matmuls of 16 rows are not
    dispatch-bound; a 49M model's step is matmul-bound).
    """

    def __init__(self, layer: torch.nn.Module, onednn: bool) -> None:
        self.input_norm, self.post_norm = _RMSNorm(layer.input_layernorm), _RMSNorm(layer.post_attention_layernorm)
        self.q, self.k, self.v, self.o = (_Linear(p, onednn) for p in _attention_projections(layer))
        self.gate, self.up, self.down = (_Linear(p, onednn) for p in _mlp_projections(layer))


class LlamaDecodeStep:
    """A ``LlamaForCausalLM`` decode step (one new token per row) in plain torch, with few ops.

    Same math as the Hugging Face forward, op for op where it matters for the values: RMSNorm in
    float32, rotary cos/sin from the model's own rotary module (any rope type), ``q*cos +
    rotate_half(q)*sin``, SDPA with the grouped query heads as transformers arranges them for one
    query token, SiLU-gated MLP. What it drops is the per-op overhead around them: module calls
    and hooks, mask building, output dataclasses, RMSNorm as six ops; q and k rotate together, and
    keys/values go straight into the reserved cache. Build it per sampling call, after
    ``llama_decode_supported``. ``onednn``: large float32 CPU weights take oneDNN's matmul; False:
    ``F.linear`` for every matmul, so that on CPU the logits are the forward's bit for bit.
    """

    def __init__(self, model: PreTrainedModel, onednn: bool = True) -> None:
        config, inner = model.config, model.model
        onednn = onednn and onednn_available()
        self.embed_weight = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        attn = inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)
        self.layers = [_LlamaLayer(layer, onednn) for layer in inner.layers[: config.num_hidden_layers]]
        self.norm = _RMSNorm(inner.norm)
        self.lm_head = _Linear(model.lm_head, onednn)

    def __call__(self, token_ids: torch.Tensor, position_ids: torch.Tensor, attend: torch.Tensor | None,
                 cache: DynamicCache, slot: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[N, V]`` (model dtype) after ``token_ids`` ``[N]`` at ``position_ids`` ``[N, 1]``.

        ``attend``: boolean ``[N, 1, 1, S]``, which of the ``S`` cached positions (this token's
        included) each row may see; None when all. Appends this token's keys/values to ``cache``, or
        with ``slot`` writes them at that position of its reserved room and attends over all of the room.
        """
        x = F.embedding(token_ids, self.embed_weight)
        cos, sin = self.rotary(x, position_ids)  # [N, 1, D], broadcast over the heads
        half = self.head_dim // 2
        # rotate_half(x) * sin == (x with its halves swapped) * (sin with its first half negated): exact
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = x + self._attention(layer, layer.input_norm(x), cos, signed_sin, attend, layer_cache, slot)
            x = x + self._mlp(layer, layer.post_norm(x))
        return self.lm_head(self.norm(x))

    def _attention(self, layer: _LlamaLayer, h: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                   attend: torch.Tensor | None, layer_cache: ReservedLayer, slot: torch.Tensor | None = None) -> torch.Tensor:
        n, heads, kv_heads, dim = h.shape[0], self.heads, self.kv_heads, self.head_dim
        qk = torch.cat([layer.q(h), layer.k(h)], dim=1).view(n, heads + kv_heads, dim)
        swapped = qk.view(n, heads + kv_heads, 2, dim // 2).flip(2).view(n, heads + kv_heads, dim)
        qk = qk * cos + swapped * signed_sin
        new_keys, new_values = qk[:, heads:, None, :], layer.v(h).view(n, kv_heads, 1, dim)
        keys, values = layer_cache.update(new_keys, new_values) if slot is None else layer_cache.write_at(slot, new_keys, new_values)
        # as transformers' SDPA path (the two round differently): SDPA groups the heads itself when nothing is
        # masked, otherwise a group's query heads become query rows of its key/value head
        if attend is None and heads != kv_heads and dim <= 256:
            out = F.scaled_dot_product_attention(qk[:, :heads, None, :], keys, values, scale=self.scaling, enable_gqa=True)
        else:
            query = qk[:, :heads].view(n, kv_heads, heads // kv_heads, dim)
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attend, scale=self.scaling)
        return layer.o(out.reshape(n, heads * dim))

    @staticmethod
    def _mlp(layer: _LlamaLayer, h: torch.Tensor) -> torch.Tensor:
        return layer.down(F.silu(layer.gate(h)) * layer.up(h))


class FixedWindowDecode:
    """``LlamaDecodeStep`` with the same shapes at every token, so that on a GPU one captured CUDA graph replays it.

    Each step attends over the whole reserved window (prompt + ``max_new_tokens`` positions, those not
    written yet masked) and writes its keys/values at a slot held in a tensor: the same kernels on the
    same buffers every token, so a graph captured at the first token replays them all, one launch per token
    instead of a few hundred (the eager step of a 122M model on an H200 spent ~12 ms of host time per token,
    2026-11-29). ``sampling.cuda_graphs``. Without CUDA the same fixed-window step runs eagerly (what the
    tests compare with the growing window). Attending over masked positions changes no value, only the
    kernels' blocking: the logits agree to rounding, not bit for bit. The first replay is checked against the
    same step run eagerly (``replay_agreement``); a graph that cannot be captured or replays other logits warns
    and the process decodes eagerly from then on (``refused`` holds why).
    """

    #: Why a capture failed or a replay disagreed in this process, once it has: later calls do not try again.
    refused: str | None = None

    def __init__(self, step: LlamaDecodeStep, cache: DynamicCache, window: torch.Tensor, prompt_length: int) -> None:
        """``window``: boolean ``[N, 1, 1, P + max_new_tokens]``, the prompt's padding mask then room (``attention_window``)."""
        n, device = window.shape[0], window.device
        self.step, self.cache, self.window, self.prompt_length = step, cache, window, prompt_length
        self.positions = torch.arange(window.shape[-1], device=device)
        self.token = torch.zeros(n, dtype=torch.long, device=device)
        self.position = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        # a graph replays the casts autocast made while it was captured: they must not come from autocast's cache
        self.autocast = torch.get_autocast_dtype("cuda") if device.type == "cuda" and torch.is_autocast_enabled("cuda") else None
        self.use_graph = device.type == "cuda" and FixedWindowDecode.refused is None  # else eager fixed-window steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, token: torch.Tensor, position: torch.Tensor, step: int) -> torch.Tensor:
        """Logits ``[N, V]`` after ``token`` at ``position``, the ``step``-th new token (its keys/values at slot P + step).

        On CUDA the returned tensor is the graph's output buffer: read it before the next call.
        """
        self.token.copy_(token)
        self.position.copy_(position)
        self.slot.fill_(self.prompt_length + step)
        if not self.use_graph:
            return self._run()
        if self.graph is None:
            return self._first_graph_step()
        self.graph.replay()
        return self.logits

    def _first_graph_step(self) -> torch.Tensor:
        """Capture the graph, replay it once, and keep it only if its logits are the eager step's (else decode eagerly).

        The check costs one comparison per sampling call; it guards against a graph that replays stale
        inputs or buffers, which would sample from the wrong distribution without any error.
        """
        try:
            eager = self._capture()
        except RuntimeError as error:  # an op the graph cannot hold: this call decodes eagerly, over the same window
            self._decode_without_graph(f"the decode step could not be captured as a CUDA graph ({error})")
            return self._run()
        self.graph.replay()
        verdict = replay_agreement(self.logits, eager)
        if not verdict:
            self._decode_without_graph(f"the decode step's CUDA graph replayed other logits than the step run eagerly ({verdict})")
            return self._run()  # again: the replay also wrote this slot's keys/values
        return self.logits

    def _decode_without_graph(self, why: str) -> None:
        warnings.warn(f"model.sampling.cuda_graphs: {why}; decoding without CUDA graphs from now on")
        FixedWindowDecode.refused = why
        self.use_graph, self.graph, self.logits = False, None, None

    def _run(self) -> torch.Tensor:
        attend = self.window & (self.positions <= self.slot)
        with torch.autocast("cuda", dtype=self.autocast, cache_enabled=False) if self.autocast is not None else nullcontext():
            return self.step(self.token, self.position, attend, self.cache, slot=self.slot)

    def _capture(self) -> torch.Tensor:
        """Warm up on a side stream (lazy initialisation stays out of the graph), then capture one step on the same stream;
        both write this step's slot. Returns the warm-up's logits: this step computed eagerly.

        One stream for both, as ``torch.cuda.make_graphed_callables`` does: libraries that keep a handle per stream
        (hipBLASLt) create it in the warm-up, not during capture. ``capture_begin``/``capture_end`` rather than
        ``torch.cuda.graph``, whose entry synchronises and empties the caching allocator: once per sampling call, that
        would hand every cached block back to the driver and make the step's forward and backward allocate it again.
        """
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                eager = self._run()
                graph.capture_begin()
                try:
                    logits = self._run()
                except BaseException:
                    try:
                        graph.capture_end()  # leave capture mode; the step's own error is the one to report
                    except RuntimeError:
                        pass
                    raise
                graph.capture_end()
        finally:  # the caller's stream sees the warm-up's writes, also when it decodes eagerly after a failure
            torch.cuda.current_stream().wait_stream(stream)
        self.graph, self.logits = graph, logits
        return eager


@dataclass(frozen=True)
class ReplayAgreement:
    """Whether a graph's replayed logits are the eager step's, up to a few roundings of their dtype (truthy when so)."""

    worst: float  # the largest absolute difference
    allowed: float

    def __bool__(self) -> bool:
        return self.worst <= self.allowed

    def __str__(self) -> str:
        return f"they differ by up to {self.worst:.3g}, allowed {self.allowed:.3g}"


def replay_agreement(replayed: torch.Tensor, eager: torch.Tensor) -> ReplayAgreement:
    """The same kernels on the same inputs give the same logits; allowed: 4 roundings of their dtype (at least 1e-5)
    relative to the largest logit, so that only a different result, not a different kernel's rounding, fails."""
    scale = max(1.0, float(eager.abs().max()))
    worst = float((replayed.float() - eager.float()).abs().max())
    return ReplayAgreement(worst if math.isfinite(worst) else math.inf, max(4 * torch.finfo(eager.dtype).eps, 1e-5) * scale)


def attention_window(prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor | None:
    """Boolean ``[N, 1, 1, P + max_new_tokens]``: the prompt's padding mask, then room that is always seen.

    None when no prompt token is padding: nothing to mask (transformers passes no mask then either).
    Slice ``[..., :S]`` for a step with ``S`` cached positions.
    """
    if bool(prompt_mask.all()):
        return None
    window = prompt_mask.new_ones(prompt_mask.shape[0], 1, 1, prompt_mask.shape[1] + max_new_tokens, dtype=torch.bool)
    window[:, 0, 0, : prompt_mask.shape[1]] = prompt_mask.bool()
    return window


#: With a replayed CUDA graph, whether every row has stopped is asked every this many tokens, not at every token: the
#: question waits for the GPU, and a replayed step leaves the host little else to do, so asking at every token would
#: serialise the host's launches with the GPU's work. Tokens drawn after the last row stopped are pad, and cut.
GRAPH_STOP_CHECK_EVERY = 8

#: Vocabularies up to this size draw from one float64 CDF; larger ones in two levels (``inverse_cdf_draw``).
FLAT_CDF_MAX_VOCAB = 4096
CDF_BLOCK = 128


def inverse_cdf_draw(probs: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """One token per row of ``probs`` ``[N, V]`` (rows summing to ~1), from one uniform per row.

    Sums are taken in float64, so rounding cannot move mass between tokens, and the uniform stays
    strictly below the total, so a token of probability 0 is never drawn (no pass over the whole
    vocabulary for its last possible token, as the draw made before).

    ``block``: 0 inverts one CDF; ``b >= 1`` draws in two levels, a block of ``b`` tokens by the CDF
    of the block sums, then a token by the CDF within that block only; None picks one CDF up to
    ``FLAT_CDF_MAX_VOCAB`` entries, else blocks of ``CDF_BLOCK`` (``bench/decode_kernels.py``: at
    49,152 entries two levels take 0.10-0.15 ms a token for 8-16 rows, one CDF 0.14-0.28 ms; at
    2,048 one CDF is faster). For the same seed both give the same token but where float64 rounding
    differs (``tests/test_decoding.py``: 20,000 of 20,000 alike).
    """
    n, vocab = probs.shape
    if block is None:
        block = 0 if vocab <= FLAT_CDF_MAX_VOCAB else CDF_BLOCK
    if block == 0:
        cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
        return torch.searchsorted(cdf, _uniform_below(cdf[:, -1:]), right=True).squeeze(1)
    pad = -vocab % block
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(n, -1, block)
    ends = blocks.sum(dim=-1, dtype=torch.float64).cumsum(dim=-1)
    u = _uniform_below(ends[:, -1:])
    chosen = torch.searchsorted(ends, u, right=True)  # a block of positive mass: ends[chosen - 1] <= u < ends[chosen]
    start = torch.where(chosen > 0, ends.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    inside = blocks.gather(1, chosen[:, :, None].expand(-1, -1, block)).squeeze(1)
    token = torch.searchsorted(torch.cumsum(inside, dim=-1, dtype=torch.float64) + start, u, right=True)
    # summed in another order, the block's own CDF can end a rounding below u: then its last token of positive mass
    last_possible = block - 1 - (inside > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    return (chosen * block + torch.minimum(token, last_possible)).squeeze(1)


def _uniform_below(total: torch.Tensor) -> torch.Tensor:
    """``[N, 1]`` float64 uniforms on [0, total), strictly below ``total`` even where the product rounds up to it."""
    u = torch.rand(total.shape, dtype=torch.float64, device=total.device) * total
    return torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))


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
    fast_decode: bool = True,
    onednn: bool = True,
    cuda_graphs: bool = False,
) -> torch.Tensor:
    """``[B*K, T]`` new tokens (samples of one prompt contiguous), pad after a row's stop token, ``T <= max_new_tokens``.

    Prompts are left-padded; positions count real tokens only, as in ``generate``. ``exact_draw``:
    ``torch.multinomial`` (generate's draw, bit for bit) instead of the inverse-CDF draw, and the
    fast step's matmuls are ``F.linear``'s, so that its logits are the forward's bit for bit.
    ``onednn``: the fast step's large float32 CPU matmuls on oneDNN (ignored with ``exact_draw``).
    ``fast_decode``: decode steps with ``LlamaDecodeStep`` where ``llama_decode_supported``.
    ``cuda_graphs``: that step over a fixed window (``FixedWindowDecode``), replayed as one CUDA graph on a GPU; whether
    every row has stopped is then asked every ``GRAPH_STOP_CHECK_EVERY`` tokens (the same tokens come back).
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
    fast_step = LlamaDecodeStep(model, onednn=onednn and not exact_draw) if fast_decode and llama_decode_supported(model) else None
    for layer in cache.layers:
        if isinstance(layer, ReservedLayer):
            layer.reserve(max_new_tokens, zeroed=fast_step is not None and cuda_graphs)
    window = attention_window(mask, max_new_tokens) if fast_step is not None else None
    next_position = positions[:, -1:].repeat_interleave(k, dim=0) + 1
    prompt_length = prompt_input_ids.shape[1]
    fixed = None
    if fast_step is not None and cuda_graphs:
        full = torch.ones(mask.shape[0], 1, 1, prompt_length + max_new_tokens, dtype=torch.bool, device=mask.device)
        fixed = FixedWindowDecode(fast_step, cache, full if window is None else window, prompt_length)
    processors = logits_processors(temperature, top_k, top_p)
    stops = torch.tensor(stop_token_ids, device=logits.device)
    unfinished = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if step < min_new_tokens:  # generate's MinNewTokensLengthLogitsProcessor: no stop token yet
            logits = logits.index_fill(-1, stops, -math.inf)
        scores = processors(None, logits) if processors else logits
        probs = torch.softmax(scores, dim=-1)
        token = torch.multinomial(probs, num_samples=1).squeeze(1) if exact_draw else inverse_cdf_draw(probs)
        token = torch.where(unfinished, token, pad_token_id)
        tokens.append(token)
        unfinished &= ~torch.isin(token, stops)
        check_every = GRAPH_STOP_CHECK_EVERY if fixed is not None and fixed.use_graph else 1
        if step == max_new_tokens - 1 or (step % check_every == check_every - 1 and not unfinished.any()):
            break
        if fixed is not None:
            logits = fixed(token, next_position, step).float()
        elif fast_step is not None:
            attend = None if window is None else window[..., : prompt_length + step + 1]
            logits = fast_step(token, next_position, attend, cache).float()
        else:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position, **with_cache).logits[:, -1].float()
        next_position = next_position + 1
    sampled = torch.stack(tokens, dim=1)
    # the fixed window may have decoded past the last row's stop (a graph asks every few tokens); elsewhere this cuts nothing
    return sampled if fixed is None else sampled[:, : sampled_length(sampled, stops)]


def sampled_length(tokens: torch.Tensor, stops: torch.Tensor) -> int:
    """Columns of ``tokens`` ``[N, T]`` up to the one where the last row stopped (all ``T`` if a row never did)."""
    stopped = torch.isin(tokens, stops)
    ends = torch.where(stopped.any(dim=1), stopped.int().argmax(dim=1), tokens.shape[1] - 1)
    return int(ends.max()) + 1
