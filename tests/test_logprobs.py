"""Padding-free packing: same per-sequence log-probs and gradients as padded passes, and a fallback."""

import random

import pytest
import torch

from l3m_lightning.constants import IGNORE_INDEX
from l3m_lightning.embedded.model import build_embedded_model
from l3m_lightning.logprobs import (
    compute_dtype, first_fit_decreasing, head_matches_logits, output_layer, pack, packed_token_logprobs, packing_matches_padding, padded_token_logprobs, pick,
    scored_positions, target_logprobs,
)

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}


def _right_padded(lengths: list[int], prompt_lengths: list[int], vocab: int, pad: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX)
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        ids[i, :n] = torch.randint(5, vocab, (n,), generator=g)
        mask[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    return ids, mask, labels


@pytest.fixture(scope="module")
def parts(tokenizer):
    pad = tokenizer.pad_token_id
    sft = _right_padded([17, 9, 30], [5, 4, 12], len(tokenizer), pad, seed=0)
    samples = _right_padded([8, 8, 25, 6, 13, 7], [6, 6, 6, 5, 5, 5], len(tokenizer), pad, seed=1)
    return [sft, samples]


def test_picking_scored_rows_gives_boolean_indexings_values_and_gradient_bit_for_bit():
    """``pick`` replaces ``logits[scored]`` for its faster backward: the log-probs and the logits' gradient must not move."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 50, generator=g)
    targets = torch.randint(0, 50, (5, 7), generator=g)
    scored = torch.rand(5, 7, generator=g) < 0.6
    weights = torch.randn(int(scored.sum()), generator=g)  # a loss that weighs each token differently
    grads = []
    for picked in ("boolean", "pick"):
        x = logits.clone().requires_grad_()
        if picked == "boolean":
            logp = torch.log_softmax(x[scored], dim=-1).gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
        else:
            positions = scored_positions(scored)
            logp = target_logprobs(pick(x, positions), targets.reshape(-1)[positions])
        (weights * logp).sum().backward()
        grads.append((logp.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[1][1][~scored].abs().sum() == 0 and grads[1][1][scored].abs().sum() > 0


@pytest.mark.parametrize("lengths,width,rows", [([5, 3, 3, 2, 9, 1], 9, 3), ([4] * 7, 10, 4), ([10], 10, 1)])
def test_first_fit_decreasing_places_every_sequence_once_within_the_width(lengths, width, rows):
    bins = first_fit_decreasing(lengths, width)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= width for b in bins)
    assert len(bins) == rows  # the fewest possible for these lengths


def test_packing_uses_fewer_rows_and_restarts_positions(parts, tokenizer):
    packed = pack(parts, tokenizer.pad_token_id)
    assert packed.num_sequences == 9
    assert packed.input_ids.shape[0] < 9 and packed.input_ids.shape[1] == 30
    for i in range(9):  # each sequence's positions run 0..n-1 and it scores n - 1 - prompt tokens
        where = packed.segment == i
        assert packed.position_ids[where].tolist() == list(range(int(where.sum())))
    assert int((packed.targets != IGNORE_INDEX).sum()) == sum(int((lab[:, 1:] != IGNORE_INDEX).sum()) for _, _, lab in parts)


def test_packed_logprobs_and_gradients_match_padded_passes(parts, tokenizer):
    model = build_embedded_model(tokenizer, TINY, seed=0)
    packed = packed_token_logprobs(model, pack(parts, tokenizer.pad_token_id), with_hidden=True)
    sums, counts = packed.sums(), packed.counts()
    (-sums.sum()).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    padded = [padded_token_logprobs(model, part, with_hidden=True) for part in parts]
    padded_sums = torch.cat([p.sums() for p in padded])
    (-padded_sums.sum()).backward()
    torch.testing.assert_close(sums, padded_sums, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == torch.cat([p.counts() for p in padded]).tolist()
    # token by token, in each sequence's order: positions and the hidden states they were predicted from
    sft, samples = packed.split(len(parts[0][0]))
    for mine, theirs in ((sft, padded[0]), (samples, padded[1])):
        for i in range(mine.num_sequences):
            a, b = mine.sequence == i, theirs.sequence == i
            assert mine.positions()[a].tolist() == list(range(int(b.sum())))
            torch.testing.assert_close(mine.hidden[a], theirs.hidden[b], rtol=1e-4, atol=1e-4)
    for a, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-3, atol=1e-5)


def test_a_gpt2_model_packs_too(parts, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert packing_matches_padding(model, parts, tokenizer.pad_token_id)


class _IgnoresPositions(torch.nn.Module):
    """A causal LM that drops position_ids: packed sequences would see each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_the_check_catches_a_model_that_attends_across_sequences(parts, tokenizer):
    model = build_embedded_model(tokenizer, TINY, seed=0)
    assert packing_matches_padding(model, parts, tokenizer.pad_token_id)
    assert not packing_matches_padding(_IgnoresPositions(model), parts, tokenizer.pad_token_id)


@pytest.mark.parametrize("precision", ["bfloat16 weights", "bfloat16 autocast"])
def test_checks_pass_a_model_computing_in_half_precision_and_still_catch_cross_sequence_attention(parts, tokenizer, precision):
    """bfloat16 rounding (0.008 nats on these sums; float32's tolerance is 0.001) is not a model that attends across sequences.

    On one H200 (2026-11-29, bfloat16 weights) the packing and shared-prompt checks failed, so neither pass ran
    there (the drift was not recorded; bfloat16 weights fail the float32 tolerance here too). The embedded
    default model's cross-sequence attention moves these sums by 1.5 nats, which half precision must still catch.
    """
    import contextlib

    model = build_embedded_model(tokenizer, seed=0)
    if precision == "bfloat16 weights":
        model, context = model.to(torch.bfloat16), contextlib.nullcontext()
    else:
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    with context:
        assert compute_dtype(model) == torch.bfloat16
        agreed = packing_matches_padding(model, parts, tokenizer.pad_token_id)
        assert agreed and agreed.worst > 1e-3  # beyond float32's tolerance: it would have failed
        leaky = packing_matches_padding(_IgnoresPositions(model), parts, tokenizer.pad_token_id)
        assert not leaky and leaky.worst > 1.0
        assert head_matches_logits(model, output_layer(model), parts[0])  # held to float32's tolerance in any dtype
        assert not head_matches_logits(_SoftCapped(model), output_layer(model), parts[0])
    assert compute_dtype(model) == (torch.bfloat16 if precision == "bfloat16 weights" else torch.float32)


def test_module_falls_back_to_two_passes_with_a_warning(parts, tokenizer):
    from toy_problem import tiny_module

    module = tiny_module(policy={"fused_forward": True}, sampling={"num_samples": 2}, constraints=[{"name": "length", "threshold": 2, "scale": 4}])
    module.model = _IgnoresPositions(module.model)
    with pytest.warns(UserWarning, match=r"fused_forward.*computed in float32, the passes differ by up to [0-9.]+ nats \(allowed 0.001\).*two padded passes"):
        assert module.packing_enabled(parts) is False
    assert module.packing_enabled(parts) is False  # decided once


def test_lengths_drawn_at_random_pack_exactly(tokenizer):
    rng = random.Random(0)
    lengths = [rng.randint(2, 40) for _ in range(23)]
    part = _right_padded(lengths, [1] * len(lengths), len(tokenizer), tokenizer.pad_token_id, seed=3)
    packed = pack([part], tokenizer.pad_token_id)
    assert int((packed.segment >= 0).sum()) == sum(lengths)
    assert packed.input_ids.numel() < part[0].numel()


# --- logits at scored tokens only: the output layer applied to the picked hidden states ------------------------------
def rows_through(layer: torch.nn.Module) -> list[int]:
    """A list that collects the number of rows each call of ``layer`` computes logits for."""
    seen: list[int] = []
    layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return seen


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_output_layer_on_scored_hidden_states_gives_the_logits_logprobs_and_gradients(parts, tokenizer, layout):
    """The same log-probs, hidden states and gradients as from the model's own logits; the output layer sees scored rows only."""
    model = build_embedded_model(tokenizer, TINY, seed=0)
    head = output_layer(model)
    assert head is model.lm_head

    def score(with_head: bool):
        model.zero_grad()
        given = head if with_head else None
        if layout == "packed":
            out = [packed_token_logprobs(model, pack(parts, tokenizer.pad_token_id), with_hidden=True, head=given)]
        else:
            out = [padded_token_logprobs(model, part, with_hidden=True, head=given) for part in parts]
        logp, hidden = torch.cat([o.logp for o in out]), torch.cat([o.hidden for o in out])
        weights = torch.linspace(0.5, 2.0, len(logp))  # any loss of the log-probs
        (weights * logp).sum().backward()
        return logp.detach(), hidden.detach(), [p.grad.clone() for p in model.parameters()]

    full = score(False)
    seen = rows_through(head)
    picked = score(True)
    scored = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, _, labels in parts)
    assert sum(seen) == scored  # no logits for prompts, padding or row tails
    torch.testing.assert_close(picked[0], full[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(picked[1], full[1], rtol=0, atol=0)
    for a, b in zip(picked[2], full[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _SoftCapped(torch.nn.Module):
    """A causal LM that soft-caps its logits after the output layer (as Gemma 2 does): its head alone scores wrongly."""

    def __init__(self, inner, cap: float = 0.5):
        super().__init__()
        self.inner, self.config, self.cap = inner, inner.config, cap

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = self.cap * torch.tanh(out.logits / self.cap)
        return out


class _NoLogitsToKeep(_SoftCapped):
    """A causal LM whose forward takes no ``logits_to_keep`` (and does not cap)."""

    def forward(self, logits_to_keep=None, **kwargs):
        if logits_to_keep is not None:
            raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
        return self.inner(**kwargs)


def test_the_head_check_passes_a_plain_causal_lm_and_catches_transformed_logits(parts, tokenizer):
    model = build_embedded_model(tokenizer, TINY, seed=0)
    assert head_matches_logits(model, output_layer(model), parts[0])
    assert not head_matches_logits(_SoftCapped(model), output_layer(model), parts[0])
    assert not head_matches_logits(_NoLogitsToKeep(model), output_layer(model), parts[0])


@pytest.mark.parametrize("wrapper", [_SoftCapped, _NoLogitsToKeep])
def test_the_module_scores_every_position_when_the_head_check_fails(parts, tokenizer, wrapper):
    from toy_problem import tiny_module

    module = tiny_module(sampling={"num_samples": 2}, constraints=[{"name": "length", "threshold": 2, "scale": 4}])
    module.model = wrapper(module.model)
    batch = {"input_ids": parts[0][0], "attention_mask": parts[0][1], "labels": parts[0][2]}
    assert module.scoring_head(parts[0]) is None and module._head_ok is False
    got, _ = module.policy_logprobs(batch, None)
    torch.testing.assert_close(got.logp, padded_token_logprobs(module.model, parts[0]).logp, rtol=0, atol=0)


def test_scored_logits_only_false_scores_every_position(parts, tokenizer):
    """``model.policy.scored_logits_only: false``: the model's own logits at every position, as before (and no check runs)."""
    from toy_problem import tiny_module

    module = tiny_module(policy={"scored_logits_only": False})
    batch = {"input_ids": parts[0][0], "attention_mask": parts[0][1], "labels": parts[0][2]}
    seen = rows_through(output_layer(module.model))
    module.policy_logprobs(batch, None)
    assert seen == [parts[0][0].numel()] and module._head_ok is None
    module.options.policy = type(module.options.policy)(**{**vars(module.options.policy), "scored_logits_only": True})
    seen.clear()
    module.policy_logprobs(batch, None)
    scored = int((parts[0][2][:, 1:] != IGNORE_INDEX).sum())
    assert module._head_ok is True and seen[-1] == scored  # after the check's own passes: the scored rows only


def test_compute_dtype_reads_fsdp1_parameter_casting():
    """Under FSDP1 with ``param_dtype`` bfloat16 (``bf16-true``) the parameters are float32 outside the forward, computed in bfloat16."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

    unit = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # a unit as FSDP1 leaves it, without a process group
    torch.nn.Module.__init__(unit)
    unit.mixed_precision = MixedPrecision(param_dtype=torch.bfloat16)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), unit)
    assert compute_dtype(model) == torch.bfloat16
    unit.mixed_precision = MixedPrecision()  # no casting: the parameters' own dtype
    assert compute_dtype(model) == torch.float32
