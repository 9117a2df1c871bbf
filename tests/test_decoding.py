"""The lean sampler samples generate's distribution: token for token with generate's draw, by frequency with its own."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch
from scipy.stats import chisquare

import l3m_lightning.decoding as decoding
from l3m_lightning.decoding import (
    FixedWindowDecode, LlamaDecodeStep, ReplayAgreement, replay_agreement, sampled_length, ReservedLayer, attention_window, inverse_cdf_draw, lean_decoding_supported, lean_sample, llama_decode_supported,
    FLAT_CDF_MAX_VOCAB, onednn_available, onednn_linear, reserved_cache,
)
from l3m_lightning.embedded.model import build_embedded_model
from l3m_lightning.options import SamplingArgs
from l3m_lightning.sampling import sample_rollouts

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_embedded_model(tokenizer, TINY, seed=0).eval()


def left_padded(lengths: list[int], pad: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded as the data module pads them."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(5, 500, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def generate_new_tokens(model, ids, mask, k, max_new_tokens, stops, pad, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=0):
    return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=k, max_new_tokens=max_new_tokens,
                          min_new_tokens=min_new_tokens or None, eos_token_id=stops, pad_token_id=pad, temperature=temperature,
                          top_k=top_k or None, top_p=top_p)[:, ids.shape[1] :]


# 60 stop tokens: rows end at different steps, some never
STOPS = list(range(100, 160))


@pytest.mark.parametrize("settings", [
    {},
    {"temperature": 0.7, "top_k": 50},
    {"top_p": 0.9},
    {"min_new_tokens": 6},
], ids=["plain", "temperature_top_k", "top_p", "min_new_tokens"])
def test_exact_draw_gives_generates_tokens_for_the_same_seed(model, tokenizer, settings):
    """Prefill once + K-fold cache, positions under left padding, in-place cache, processors, stopping: all as generate."""
    pad = tokenizer.pad_token_id
    ids, mask = left_padded([3, 9, 6], pad)
    torch.manual_seed(7)
    expected = generate_new_tokens(model, ids, mask, 3, 16, STOPS, pad, **settings)
    torch.manual_seed(7)
    got = lean_sample(model, ids, mask, 3, 16, STOPS, pad, exact_draw=True, **settings)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    finished = torch.isin(got, torch.tensor(STOPS)).any(dim=1)
    assert 0 < int(finished.sum()) < len(got), "the case must have rows that stop and rows that run to the end"


def test_the_loop_ends_when_every_row_has_stopped(model, tokenizer):
    pad = tokenizer.pad_token_id
    ids, mask = left_padded([4, 5], pad)
    every_token = list(range(len(tokenizer)))  # any token stops a row: one step
    torch.manual_seed(0)
    got = lean_sample(model, ids, mask, 2, 10, every_token, pad)
    assert got.shape == (4, 1)


def test_min_new_tokens_holds_back_the_stop_tokens(model, tokenizer):
    pad = tokenizer.pad_token_id
    ids, mask = left_padded([4, 7], pad)
    many_stops = list(range(100, 600))  # a quarter of the vocabulary: rows would stop early
    torch.manual_seed(0)
    got = lean_sample(model, ids, mask, 4, 12, many_stops, pad, min_new_tokens=5)
    assert got.shape[1] > 5 and not torch.isin(got[:, :5], torch.tensor(many_stops)).any()
    torch.manual_seed(0)
    free = lean_sample(model, ids, mask, 4, 12, many_stops, pad)
    assert torch.isin(free[:, :5], torch.tensor(many_stops)).any(), "without it, some row stops within 5 tokens (the check has teeth)"


# None: automatic (one CDF for a small vocabulary); 0: one CDF; 2 and 4: two levels (4 pads the 6-token vocabulary to 8)
DRAW_BLOCKS = pytest.mark.parametrize("block", [None, 0, 2, 4], ids=["automatic", "flat", "blocks_of_2", "blocks_of_4_padded"])


@DRAW_BLOCKS
def test_inverse_cdf_draw_matches_the_probabilities(block):
    probs = torch.tensor([0.05, 0.0, 0.4, 0.25, 0.0, 0.3])
    torch.manual_seed(0)
    draws = inverse_cdf_draw(probs.expand(40_000, -1), block)
    assert draws.max() < len(probs)
    counts = torch.bincount(draws, minlength=len(probs)).double()
    assert counts[1] == 0 and counts[4] == 0  # probability 0: never drawn
    keep = probs > 0
    expected = probs[keep].double() / probs.double().sum() * counts.sum()
    assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-3


@DRAW_BLOCKS
def test_inverse_cdf_draw_never_returns_a_zero_probability_tail(monkeypatch, block):
    """A uniform that rounds onto the CDF's end picks the last possible token, not a masked one after it."""
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype")))
    assert inverse_cdf_draw(probs, block).tolist() == [1]


def test_two_level_draw_keeps_to_the_blocks_mass_when_its_own_cdf_rounds_short(monkeypatch):
    """The block's CDF, summed in another order than its block sum, can end below the uniform: its last token of mass then.

    1 followed by 127 tokens of 2^-53: the vectorised block sum keeps them (1 + 127 * 2^-53), the
    running CDF rounds each one away (1.0), so a uniform just below the block's end lies past its CDF.
    """
    probs = torch.zeros(1, 256)
    probs[0, 0], probs[0, 1:128] = 1.0, 2.0**-53
    block_end = probs[:, :128].sum(dtype=torch.float64)
    assert block_end > torch.cumsum(probs[0, :128], dim=0, dtype=torch.float64)[-1]  # the rounding this test needs
    monkeypatch.setattr(decoding, "_uniform_below", lambda total: torch.nextafter(total, torch.zeros_like(total)))
    assert inverse_cdf_draw(probs, 128).tolist() == [127]  # not 128: the next block's first token, of probability 0


def test_a_large_vocabulary_draws_in_two_levels_with_the_same_law():
    vocab = FLAT_CDF_MAX_VOCAB + 3
    probs = torch.zeros(vocab)
    probs[[0, 127, 128, vocab - 1]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.manual_seed(0)
    draws = inverse_cdf_draw(probs.expand(20_000, -1))
    torch.manual_seed(0)
    assert torch.equal(draws, inverse_cdf_draw(probs.expand(20_000, -1), 0))  # one CDF: the same tokens for the seed
    counts = torch.stack([(draws == t).sum() for t in (0, 127, 128, vocab - 1)]).double()
    assert counts.sum() == len(draws)
    assert chisquare(counts.numpy(), (torch.tensor([0.1, 0.2, 0.3, 0.4]) * len(draws)).numpy()).pvalue > 1e-3


def test_lean_first_tokens_follow_the_models_distribution(model, tokenizer):
    """The whole lean path (prefill, K-fold logits, top-k, inverse-CDF draw) against the model's own next-token law."""
    pad = tokenizer.pad_token_id
    ids, mask = left_padded([5], pad)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
    top = logits.topk(6)
    expected = torch.softmax(top.values.double(), dim=-1)
    torch.manual_seed(0)
    first = lean_sample(model, ids, mask, 20_000, 1, [-1], pad, top_k=6)[:, 0]
    counts = torch.stack([(first == t).sum() for t in top.indices]).double()
    assert counts.sum() == len(first)  # nothing outside the top 6
    assert chisquare(counts.numpy(), (expected * len(first)).numpy()).pvalue > 1e-3


def test_sample_rollouts_lean_and_generate_agree_with_the_exact_draw(model, tokenizer, monkeypatch):
    """``decoder: lean`` goes through lean_sample (here with generate's draw) chunk by chunk, like generate."""
    import l3m_lightning.sampling as sampling

    pad = tokenizer.pad_token_id
    ids, mask = left_padded([3, 8, 5, 6], pad)
    kwargs = dict(num_samples=2, max_new_tokens=10, eos_token_id=STOPS, pad_token_id=pad, max_rows_per_call=4)
    torch.manual_seed(3)
    reference = sample_rollouts(model, ids, mask, decoder="generate", **kwargs)
    exact = lambda *a, **kw: lean_sample(*a, **kw, exact_draw=True)  # noqa: E731
    monkeypatch.setattr(sampling, "lean_sample", exact)
    torch.manual_seed(3)
    lean = sample_rollouts(model, ids, mask, decoder="lean", **kwargs)
    assert lean.completion_ids == reference.completion_ids
    assert torch.equal(lean.input_ids, reference.input_ids) and torch.equal(lean.finished, reference.finished)


@pytest.mark.parametrize("onednn", [True, False])
def test_sample_rollouts_passes_the_onednn_choice_to_the_decode_step(model, tokenizer, monkeypatch, onednn):
    built = []
    original = LlamaDecodeStep.__init__
    monkeypatch.setattr(LlamaDecodeStep, "__init__", lambda self, m, onednn=True: built.append(onednn) or original(self, m, onednn))
    ids, mask = left_padded([3, 5], tokenizer.pad_token_id)
    sample_rollouts(model, ids, mask, 2, 4, STOPS, tokenizer.pad_token_id, decoder="lean", onednn=onednn)
    assert built == [onednn]


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward cannot return only the last logits: the lean loop must not take it."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=use_cache)


def test_models_the_lean_loop_cannot_run_fall_back_to_generate(model, tokenizer, monkeypatch):
    assert lean_decoding_supported(model)
    assert not lean_decoding_supported(NoLogitsToKeep(model))
    import l3m_lightning.sampling as sampling

    calls = []
    monkeypatch.setattr(sampling, "_generate", lambda *a, **kw: calls.append("generate") or [torch.zeros(2, 1, dtype=torch.long)])
    monkeypatch.setattr(sampling, "lean_decoding_supported", lambda m: False)
    ids, mask = left_padded([3], tokenizer.pad_token_id)
    sample_rollouts(model, ids, mask, 2, 4, STOPS, tokenizer.pad_token_id, decoder="lean")
    assert calls == ["generate"]
    calls.clear()
    monkeypatch.setattr(sampling, "lean_decoding_supported", lambda m: True)
    sample_rollouts(model, ids, mask, 2, 4, STOPS, tokenizer.pad_token_id, decoder="lean", synced_gpus=True)  # FSDP1 lock-step
    assert calls == ["generate"]


def test_a_lora_wrapped_policy_takes_the_lean_loop_and_matches_generate(model, tokenizer):
    peft = pytest.importorskip("peft")
    import copy

    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear")).eval()
    assert lean_decoding_supported(wrapped)
    pad = tokenizer.pad_token_id
    ids, mask = left_padded([4, 6], pad)
    torch.manual_seed(5)
    expected = generate_new_tokens(wrapped, ids, mask, 2, 8, STOPS, pad)
    torch.manual_seed(5)
    assert torch.equal(lean_sample(wrapped, ids, mask, 2, 8, STOPS, pad, exact_draw=True), expected)


def prefilled_caches(model, ids, mask, room, copies=2):
    """``copies`` caches, each holding the same prefill of the prompts and ``room`` reserved positions."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    caches = []
    for _ in range(copies):
        cache = reserved_cache(model.config)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        for layer in cache.layers:
            layer.reserve(room)
        caches.append(cache)
    return caches, positions[:, -1:] + 1


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN (mkldnn) matmul")


def step_matmuls(step: LlamaDecodeStep) -> list:
    return [step.lm_head.matmul] + [getattr(layer, name).matmul for layer in step.layers for name in "q k v o gate up down".split()]


@pytest.mark.parametrize("matmuls", ["f_linear", pytest.param("onednn", marks=needs_onednn)])
@pytest.mark.parametrize("lengths", [[3, 9, 6], [5, 5]], ids=["left_padded", "unpadded"])
@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True}], ids=["gqa", "gqa_with_biases"])
def test_the_llama_decode_step_gives_the_forwards_logits_and_cache(tokenizer, monkeypatch, matmuls, lengths, overrides):
    """Step after step, same logits and same cached keys/values as the Hugging Face forward (GQA: 4 query heads on 2 kv heads).

    Padded and unpadded prompts take SDPA's two grouped-head forms, as transformers does. The
    contract is the tolerance. With ``F.linear`` (the tiny model's weights are below oneDNN's
    threshold) the step runs the very kernels the forward runs, so the logits also agree bitwise,
    which is what gives the exact draw generate's tokens (the test after this one) and what catches
    a rounding-level slip such as the wrong grouped-head form. ``onednn``: every matmul on oneDNN
    (threshold 0), which rounds differently: the tolerance only.
    """
    if matmuls == "onednn":
        monkeypatch.setattr(decoding, "ONEDNN_MIN_WEIGHT_ELEMENTS", 0)
    model = build_embedded_model(tokenizer, {**TINY, **overrides}, seed=0).eval()
    assert llama_decode_supported(model)
    ids, mask = left_padded(lengths, tokenizer.pad_token_id)
    steps = 5
    (hf_cache, fast_cache), position = prefilled_caches(model, ids, mask, steps)
    fast = LlamaDecodeStep(model)
    assert set(step_matmuls(fast)) == {onednn_linear if matmuls == "onednn" else torch.nn.functional.linear}
    window = attention_window(mask, steps)
    assert (window is None) == (min(lengths) == max(lengths))
    tokens = torch.randint(5, 500, (steps, len(lengths)), generator=torch.Generator().manual_seed(1))
    for step, token in enumerate(tokens):
        mask = torch.cat([mask, mask.new_ones(len(lengths), 1)], dim=1)
        with torch.no_grad():
            expected = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=hf_cache,
                             use_cache=True).logits[:, -1]
            got = fast(token, position, None if window is None else window[..., : mask.shape[1]], fast_cache)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        if matmuls == "f_linear":
            assert torch.equal(got, expected), f"step {step}: close but not bitwise"
        position = position + 1
    for hf_layer, fast_layer in zip(hf_cache.layers, fast_cache.layers):
        torch.testing.assert_close(fast_layer.keys, hf_layer.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast_layer.values, hf_layer.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [[3, 9, 6], [5, 5]], ids=["left_padded", "unpadded"])
def test_the_llama_decode_step_under_bf16_autocast_gives_the_forwards_logits(tokenizer, lengths):
    """``bf16-mixed`` training samples inside Lightning's autocast (float32 weights, bfloat16 matmuls and attention):
    the step casts as the forward does, so its logits and cache are the forward's under the same autocast
    (bitwise here, as with ``F.linear`` in float32; the tolerance is the contract, as on a GPU's kernels)."""
    model = build_embedded_model(tokenizer, TINY, seed=0).eval()
    ids, mask = left_padded(lengths, tokenizer.pad_token_id)
    steps = 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (hf_cache, fast_cache), position = prefilled_caches(model, ids, mask, steps)
        assert llama_decode_supported(model)
        fast, window = LlamaDecodeStep(model, onednn=False), attention_window(mask, steps)
        for token in torch.randint(5, 500, (steps, len(lengths)), generator=torch.Generator().manual_seed(1)):
            mask = torch.cat([mask, mask.new_ones(len(lengths), 1)], dim=1)
            with torch.no_grad():
                expected = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=hf_cache,
                                 use_cache=True).logits[:, -1]
                got = fast(token, position, None if window is None else window[..., : mask.shape[1]], fast_cache)
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
            assert torch.equal(got, expected), "close but not bitwise: on CPU the step runs the forward's kernels"
            position = position + 1
    for hf_layer, fast_layer in zip(hf_cache.layers, fast_cache.layers):
        torch.testing.assert_close(fast_layer.keys.float(), hf_layer.keys.float(), rtol=1e-2, atol=1e-2)


@needs_onednn
def test_the_decode_step_takes_onednn_for_large_float32_weights_and_f_linear_otherwise(tokenizer):
    """MLP weights of 256x1280 (327,680 elements) take oneDNN, the 256x256 attention weights F.linear; onednn=False: F.linear for all."""
    model = build_embedded_model(tokenizer, {**TINY, "hidden_size": 256, "intermediate_size": 1280}, seed=0).eval()
    step = LlamaDecodeStep(model)
    for layer in step.layers:
        assert [getattr(layer, n).matmul for n in "q k v o".split()] == [torch.nn.functional.linear] * 4
        assert [getattr(layer, n).matmul for n in "gate up down".split()] == [onednn_linear] * 3
    assert set(step_matmuls(LlamaDecodeStep(model, onednn=False))) == {torch.nn.functional.linear}
    assert set(step_matmuls(LlamaDecodeStep(model.bfloat16()))) == {torch.nn.functional.linear}  # float32 only


@needs_onednn
def test_the_onednn_decode_step_samples_the_models_second_token_law(tokenizer, monkeypatch):
    """Two tokens per row through the fast step on oneDNN: the second token's frequencies are the model's marginal.

    Bitwise equality with generate cannot hold once the matmuls round differently, so the law is
    checked: P(t2) = sum over t1 of P(t1) P(t2 | t1), from the Hugging Face forward, against 20,000
    draws. The output layer is scaled up so the law is peaked (a random-init model's is near uniform,
    and no error would show): sampling at temperature 1.05 instead fails this test (p = 5e-14).
    """
    monkeypatch.setattr(decoding, "ONEDNN_MIN_WEIGHT_ELEMENTS", 0)
    model = build_embedded_model(tokenizer, TINY, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    calls = counting_fast_steps(monkeypatch)
    pad = tokenizer.pad_token_id
    ids, mask = left_padded([5], pad)
    with torch.no_grad():
        first = torch.softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1)
        vocab = first.shape[0]
        extended = torch.cat([ids.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        second = torch.softmax(model(input_ids=extended).logits[:, -1].double(), dim=-1)
    marginal = first @ second
    torch.manual_seed(0)
    drawn = lean_sample(model, ids, mask, 20_000, 2, [-1], pad)[:, 1]
    assert len(calls) == 1  # the second token came from the fast step
    counts = torch.bincount(drawn, minlength=vocab).double()
    common = marginal * len(drawn) >= 5  # chi-square's rule of thumb; the rare tokens pooled into one cell
    assert 5 <= int(common.sum()) < vocab
    observed = torch.cat([counts[common], counts[~common].sum()[None]])
    expected = torch.cat([marginal[common], marginal[~common].sum()[None]]) * len(drawn)
    assert chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item()).pvalue > 1e-3


def counting_fast_steps(monkeypatch) -> list[int]:
    """Counts ``LlamaDecodeStep`` calls made by ``lean_sample``."""
    calls = []
    original = LlamaDecodeStep.__call__
    monkeypatch.setattr(LlamaDecodeStep, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    return calls


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7, "top_k": 50}], ids=["plain", "temperature_top_k"])
@pytest.mark.parametrize("lengths", [[3, 9, 6], [7, 7]], ids=["left_padded", "unpadded"])
def test_the_fast_llama_step_gives_generates_tokens_with_the_exact_draw(model, tokenizer, monkeypatch, settings, lengths):
    """Token for token, as the logits are generate's bit for bit (the test above); and the fast step really ran."""
    pad = tokenizer.pad_token_id
    ids, mask = left_padded(lengths, pad)
    calls = counting_fast_steps(monkeypatch)
    torch.manual_seed(11)
    expected = generate_new_tokens(model, ids, mask, 3, 16, STOPS, pad, **settings)
    torch.manual_seed(11)
    got = lean_sample(model, ids, mask, 3, 16, STOPS, pad, exact_draw=True, **settings)
    assert torch.equal(got, expected)
    assert len(calls) == got.shape[1] - 1  # every step after the prefill's


def no_fast_step(monkeypatch) -> None:
    def refuse(self, model, onednn=True):
        raise AssertionError("LlamaDecodeStep built for a model it does not support")
    monkeypatch.setattr(LlamaDecodeStep, "__init__", refuse)


def tiny_gpt2():
    import transformers

    config = transformers.GPT2Config(vocab_size=600, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).eval()


def test_models_the_fast_step_cannot_run_take_the_models_forward(model, tokenizer, monkeypatch):
    """A PEFT-wrapped Llama, unsupported Llamas, another architecture: ``lean_sample`` decodes with their own forward."""
    import copy

    gelu = build_embedded_model(tokenizer, {**TINY, "hidden_act": "gelu"}, seed=0).eval()
    half = build_embedded_model(tokenizer, TINY, seed=0).eval().half()
    training = build_embedded_model(tokenizer, TINY, seed=0).train()
    eager = build_embedded_model(tokenizer, TINY, seed=0).eval()
    eager.set_attn_implementation("eager")
    others = [gelu, half, training, eager, tiny_gpt2()]
    try:
        import peft
    except ImportError:
        pass
    else:
        lora = peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear")
        others.append(peft.get_peft_model(copy.deepcopy(model), lora).eval())
    assert llama_decode_supported(model)
    no_fast_step(monkeypatch)
    pad = tokenizer.pad_token_id
    ids, mask = left_padded([4, 6], pad)
    for other in others:
        assert lean_decoding_supported(other) and not llama_decode_supported(other)
        forwards = []
        other.register_forward_hook(lambda *args: forwards.append(1))
        torch.manual_seed(0)
        got = lean_sample(other, ids, mask, 2, 5, [-1], pad)
        assert got.shape == (4, 5) and len(forwards) == 5  # the prefill and four decode steps
    with pytest.raises(AssertionError, match="built for a model"):
        lean_sample(model, ids, mask, 2, 5, [-1], pad)  # the patch has teeth


def test_fast_decode_false_keeps_the_models_forward(model, tokenizer, monkeypatch):
    no_fast_step(monkeypatch)
    ids, mask = left_padded([4, 6], tokenizer.pad_token_id)
    assert lean_sample(model, ids, mask, 2, 5, [-1], tokenizer.pad_token_id, fast_decode=False).shape == (4, 5)


def test_reserved_cache_writes_in_place_after_reserve(model):
    cache = reserved_cache(model.config)
    assert all(isinstance(layer, ReservedLayer) for layer in cache.layers)
    layer = cache.layers[0]
    k = torch.randn(2, 2, 3, 8)
    layer.update(k, k.clone())
    layer.reserve(4, zeroed=True)
    buffer = layer._keys_buffer
    # zeroed room: a fixed-window step attends over it masked, and a masked NaN would still poison attention
    assert not buffer[..., 3:, :].any() and not layer._values_buffer[..., 3:, :].any()
    new = torch.randn(2, 2, 1, 8)
    keys, _ = layer.update(new, new.clone())
    assert keys.data_ptr() == buffer.data_ptr() and keys.shape[-2] == 4
    assert torch.equal(keys[..., :3, :], k) and torch.equal(keys[..., 3:, :], new)


def test_sampling_options_check_the_decoder_and_min_new_tokens():
    with pytest.raises(ValueError, match=r"model.sampling.decoder must be one of lean, generate, got 'vllm'"):
        SamplingArgs(decoder="vllm").validate("model.sampling")
    with pytest.raises(ValueError, match=r"model.sampling.onednn must be true or false, got 'no'"):
        SamplingArgs(onednn="no").validate("model.sampling")
    with pytest.raises(ValueError, match=r"model.sampling.min_new_tokens must be in \[0, max_new_tokens=8\], got 9"):
        SamplingArgs(max_new_tokens=8, min_new_tokens=9).validate("model.sampling")


@pytest.fixture()
def process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_an_fsdp2_llama_takes_the_fast_step_only_while_gathered(model, tokenizer, process_group, monkeypatch):
    """Sharded (DTensor parameters): the model's forward; gathered for generation: the fast step, with generate's tokens."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from l3m_lightning.sharding import unsharded_for_generation

    pad = tokenizer.pad_token_id
    ids, mask = left_padded([3, 9, 6], pad)
    torch.manual_seed(2)
    expected = generate_new_tokens(model, ids, mask, 2, 8, STOPS, pad)
    sharded = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (1,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    assert not llama_decode_supported(sharded)
    with torch.no_grad():
        sharded(input_ids=ids, attention_mask=mask)  # FSDP2's lazy init, as in training
    calls = counting_fast_steps(monkeypatch)
    with unsharded_for_generation(sharded) as gathered:
        assert gathered and llama_decode_supported(sharded)
        torch.manual_seed(2)
        got = lean_sample(sharded, ids, mask, 2, 8, STOPS, pad, exact_draw=True)
    assert torch.equal(got, expected) and calls


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7, "top_k": 50}, {"min_new_tokens": 6}], ids=["plain", "temperature_top_k", "min_new_tokens"])
@pytest.mark.parametrize("lengths", [[3, 9, 6], [7, 7]], ids=["left_padded", "unpadded"])
def test_the_fixed_window_step_gives_generates_tokens_with_the_exact_draw(model, tokenizer, monkeypatch, settings, lengths):
    """``cuda_graphs``: every step attends over the whole reserved window (unwritten positions masked) and writes at a slot.
    On CPU it runs eagerly (no graph), and the masked positions change no value: generate's tokens, token for token."""
    pad = tokenizer.pad_token_id
    ids, mask = left_padded(lengths, pad)
    widths = []
    original = FixedWindowDecode._run
    monkeypatch.setattr(FixedWindowDecode, "_run", lambda self: widths.append(self.window.shape[-1]) or original(self))
    torch.manual_seed(11)
    expected = generate_new_tokens(model, ids, mask, 3, 16, STOPS, pad, **settings)
    torch.manual_seed(11)
    got = lean_sample(model, ids, mask, 3, 16, STOPS, pad, exact_draw=True, cuda_graphs=True, **settings)
    assert torch.equal(got, expected)
    assert widths == [ids.shape[1] + 16] * (got.shape[1] - 1)  # every step after the prefill's, over the same window


def test_sampling_options_check_cuda_graphs():
    with pytest.raises(ValueError, match="cuda_graphs must be true or false"):
        SamplingArgs(cuda_graphs="yes").validate("model.sampling")


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_the_modules_sampling_passes_cuda_graphs_to_the_decode_loop(tokenizer, monkeypatch, cuda_graphs):
    from toy_problem import chat_batch, tiny_module

    built, room_zeroed = [], []
    original, reserve = FixedWindowDecode.__init__, ReservedLayer.reserve
    monkeypatch.setattr(FixedWindowDecode, "__init__", lambda self, *a: built.append(1) or original(self, *a))
    monkeypatch.setattr(ReservedLayer, "reserve", lambda self, n, zeroed=False: room_zeroed.append(zeroed) or reserve(self, n, zeroed))
    module = tiny_module(sampling={"num_samples": 2, "max_new_tokens": 4, "min_new_tokens": 4, "cuda_graphs": cuda_graphs})
    rollouts = module.sample(chat_batch(module.tokenizer), 2)
    assert len(built) == int(cuda_graphs) and all(len(ids) == 4 for ids in rollouts.completion_ids)
    assert room_zeroed and set(room_zeroed) == {cuda_graphs}  # the fixed window reads the unwritten room: zeros there


class _FakeCuda:
    """torch.cuda's streams and graphs as ``FixedWindowDecode._capture`` uses them, on CPU, so that its own code runs.

    Captured work runs eagerly here; the graph remembers which decode step was captured, and ``replay`` reruns it
    into the captured output buffer. ``stale``: a faulty graph, replaying the inputs of the token it was captured at.
    ``fail_capture``: the step raises while being captured, as an op a graph cannot hold does.
    """

    def __init__(self, stale: bool = False, fail_capture: bool = False) -> None:
        self.stale, self.fail_capture = stale, fail_capture
        self.graphs: list[_FakeCuda.Graph] = []
        self.capturing: _FakeCuda.Graph | None = None
        self.events: list[str] = []
        fake = self

        class Stream:
            def wait_stream(self, other) -> None:
                fake.events.append(f"{self.name} waits for {other.name}")

        class Graph:
            def __init__(self) -> None:
                self.decode, self.replays = None, 0
                fake.graphs.append(self)

            def capture_begin(self) -> None:
                fake.events.append("capture_begin")
                fake.capturing = self

            def capture_end(self) -> None:
                fake.events.append("capture_end")
                fake.capturing = None

            def replay(self) -> None:
                self.replays += 1
                decode = self.decode
                current = decode.token.clone()
                if fake.stale:
                    decode.token.copy_(self.captured_token)
                decode.logits.copy_(decode._run())
                decode.token.copy_(current)

        self.Stream, self.Graph = Stream, Graph
        self.main, self.side = Stream(), Stream()
        self.main.name, self.side.name = "main", "side"

    def install(self, monkeypatch) -> None:
        fake = self
        monkeypatch.setattr(torch.cuda, "Stream", lambda: fake.side)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: fake.main)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.Graph)
        original_init, original_run = FixedWindowDecode.__init__, FixedWindowDecode._run

        def on_a_gpu(decode, *args):
            original_init(decode, *args)
            decode.use_graph = FixedWindowDecode.refused is None  # as on CUDA

        def run(decode):
            if fake.capturing is not None:  # the step being captured
                fake.capturing.decode, fake.capturing.captured_token = decode, decode.token.roll(1)
                if fake.fail_capture:
                    raise RuntimeError("operation not permitted when stream is capturing")
            return original_run(decode)

        monkeypatch.setattr(FixedWindowDecode, "__init__", on_a_gpu)
        monkeypatch.setattr(FixedWindowDecode, "_run", run)
        monkeypatch.setattr(FixedWindowDecode, "refused", None)


def _fake_gpu_graphs(monkeypatch, stale: bool = False, fail_capture: bool = False) -> _FakeCuda:
    fake = _FakeCuda(stale, fail_capture)
    fake.install(monkeypatch)
    return fake


def _without_and_with_graphs(model, tokenizer, stops=STOPS, seed=5, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The same seed's samples of three left-padded prompts × K = 2, ≤ 12 tokens: the eager loop's, then with cuda_graphs."""
    pad = tokenizer.pad_token_id
    ids, mask = left_padded([3, 9, 6], pad)
    torch.manual_seed(seed)
    expected = lean_sample(model, ids, mask, 2, 12, stops, pad, exact_draw=True, **settings)
    torch.manual_seed(seed)
    return expected, lean_sample(model, ids, mask, 2, 12, stops, pad, exact_draw=True, cuda_graphs=True, **settings)


def test_a_graph_whose_replay_agrees_is_replayed_for_every_token(model, tokenizer, monkeypatch, recwarn):
    """One capture per sampling call, checked once, then one replay per token: the tokens of the eager loop."""
    fake = _fake_gpu_graphs(monkeypatch)
    expected, got = _without_and_with_graphs(model, tokenizer, min_new_tokens=12)
    assert torch.equal(got, expected)
    assert len(fake.graphs) == 1 and fake.graphs[0].replays == got.shape[1] - 1  # every decode step after the prefill
    # the warm-up and the capture on the side stream, which waits for the caller's and is waited for by it
    assert fake.events == ["side waits for main", "capture_begin", "capture_end", "main waits for side"]
    assert not [w for w in recwarn if "cuda_graphs" in str(w.message)]


def test_a_graph_that_replays_stale_inputs_is_dropped_and_the_call_decodes_eagerly(model, tokenizer, monkeypatch):
    """A graph whose first replay differs from the step run eagerly is never used: one warning with the numbers,
    the same tokens as without graphs, the graph not replayed again, and no capture in the process's later calls."""
    fake = _fake_gpu_graphs(monkeypatch, stale=True)
    with pytest.warns(UserWarning, match=r"replayed other logits than the step run eagerly \(they differ by up to") as caught:
        expected, got = _without_and_with_graphs(model, tokenizer)
    assert torch.equal(got, expected)
    assert len(fake.graphs) == 1 and fake.graphs[0].replays == 1
    assert sum("cuda_graphs" in str(w.message) for w in caught) == 1
    assert "replayed other logits" in FixedWindowDecode.refused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, again = _without_and_with_graphs(model, tokenizer)
    assert torch.equal(again, expected) and len(fake.graphs) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_agreement_allows_a_few_roundings_of_the_logits_dtype(dtype):
    eager = torch.tensor([[12.0, -3.0, 0.5]], dtype=dtype)
    eps = torch.finfo(dtype).eps
    assert replay_agreement(eager.clone(), eager)
    assert replay_agreement(eager + 3 * eps * 12, eager)  # within 4 roundings of the largest logit
    assert not replay_agreement(eager + 8 * max(eps, 2.5e-6) * 12, eager)
    assert not replay_agreement(torch.full_like(eager, float("nan")), eager)
    verdict = replay_agreement(eager.roll(1, dims=1), eager)
    assert not verdict and "differ by up to 15" in str(verdict) and isinstance(verdict, ReplayAgreement)


def test_a_step_that_fails_while_captured_ends_the_capture_and_the_call_decodes_eagerly(model, tokenizer, monkeypatch):
    """``_capture`` itself (torch.cuda faked): the step's error ends the capture, the caller's stream still waits for the
    warm-up, and the call warns once and gives the tokens of the loop without graphs."""
    fake = _fake_gpu_graphs(monkeypatch, fail_capture=True)
    with pytest.warns(UserWarning, match=r"could not be captured as a CUDA graph \(operation not permitted") as caught:
        expected, got = _without_and_with_graphs(model, tokenizer)
    assert torch.equal(got, expected)
    assert fake.events == ["side waits for main", "capture_begin", "capture_end", "main waits for side"]
    assert len(fake.graphs) == 1 and fake.graphs[0].replays == 0
    assert sum("cuda_graphs" in str(w.message) for w in caught) == 1


def test_with_a_replayed_graph_the_loop_asks_whether_all_rows_stopped_every_few_tokens(model, tokenizer, monkeypatch):
    """The stop question waits for the GPU, so with a graph it is asked every GRAPH_STOP_CHECK_EVERY tokens: the loop
    runs past the last row's stop to the next question, and the pad it drew there is cut: the eager loop's tokens."""
    fake = _fake_gpu_graphs(monkeypatch)
    # most tokens stop a row: every row stops within a few tokens
    expected, got = _without_and_with_graphs(model, tokenizer, stops=list(range(1500)), seed=7)
    assert expected.shape[1] < decoding.GRAPH_STOP_CHECK_EVERY  # every row stopped before the first question
    assert torch.equal(got, expected)
    assert fake.graphs[0].replays == decoding.GRAPH_STOP_CHECK_EVERY - 1  # decoded on to the question


def test_sampled_length_ends_at_the_last_rows_stop():
    stops = torch.tensor([5, 9])
    tokens = torch.tensor([[1, 5, 0, 0, 0], [2, 3, 9, 0, 0], [4, 4, 5, 5, 0]])
    assert sampled_length(tokens, stops) == 3
    assert sampled_length(torch.tensor([[1, 5, 0], [2, 3, 4]]), stops) == 3  # a row that never stopped: every column
    assert sampled_length(torch.tensor([[5, 9, 9]]), stops) == 1  # pad that is itself a stop token
