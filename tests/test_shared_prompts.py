"""The shared-prompt pass: each prompt through the model once for its reference and K samples, same log-probs and gradients as whole rows."""

from __future__ import annotations

import pytest
import torch

from l3m_lightning.constants import IGNORE_INDEX
from l3m_lightning.embedded.model import build_embedded_model
from l3m_lightning.logprobs import padded_token_logprobs, share_prompts, shared_prompt_token_logprobs, sharing_matches_padding

GQA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def prompts_and_rows(pad: int, prompt_lengths: list[int], responses: list[list[int]], of_prompt: list[int], seed: int = 0):
    """Left-padded prompts, and right-padded rows = prompt + response with the response labelled (as the data module and the sampler lay them out)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 400, (n,), generator=g) for n in prompt_lengths]
    width = max(prompt_lengths)
    prompt_ids = torch.full((len(prompts), width), pad)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        prompt_ids[i, width - len(p):] = p
        prompt_mask[i, width - len(p):] = 1
    rows = [torch.cat([prompts[p], torch.tensor(r)]) for r, p in zip(responses, of_prompt)]
    row_width = max(map(len, rows))
    ids = torch.full((len(rows), row_width), pad)
    mask = torch.zeros((len(rows), row_width), dtype=torch.long)
    labels = torch.full((len(rows), row_width), IGNORE_INDEX)
    for j, (row, p) in enumerate(zip(rows, of_prompt)):
        ids[j, : len(row)] = row
        mask[j, : len(row)] = 1
        labels[j, prompt_lengths[p] : len(row)] = row[prompt_lengths[p]:]
    return prompt_ids, prompt_mask, (ids, mask, labels), torch.tensor(of_prompt)


@pytest.fixture()
def step(tokenizer):
    """Two prompts of different lengths; their references; K = 3 samples each of varied lengths."""
    pad = tokenizer.pad_token_id
    g = torch.Generator().manual_seed(1)
    response = lambda n: torch.randint(5, 400, (n,), generator=g).tolist()  # noqa: E731
    prompt_ids, prompt_mask, sft, sft_of = prompts_and_rows(pad, [6, 11], [response(9), response(4)], [0, 1])
    _, _, samples, samples_of = prompts_and_rows(pad, [6, 11], [response(n) for n in (3, 7, 1, 5, 5, 2)], [0, 0, 0, 1, 1, 1])
    return prompt_ids, prompt_mask, [(sft, sft_of), (samples, samples_of)]


def test_shared_pass_gives_the_whole_rows_logprobs_hidden_states_and_gradients(tokenizer, step):
    model = build_embedded_model(tokenizer, GQA, seed=0).train()
    prompt_ids, prompt_mask, parts = step
    shared = share_prompts(prompt_ids, prompt_mask, parts, tokenizer.pad_token_id)
    got = shared_prompt_token_logprobs(model, shared, with_hidden=True)
    whole = [padded_token_logprobs(model, rows, with_hidden=True) for rows, _ in parts]
    expected_logp = torch.cat([w.logp for w in whole])
    torch.testing.assert_close(got.logp, expected_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.hidden, torch.cat([w.hidden for w in whole]), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.sequence, torch.cat([whole[0].sequence, whole[1].sequence + 2])) and got.num_sequences == 8
    weights = torch.linspace(0.5, 2.0, len(expected_logp))  # any loss of the log-probs: gradients through the shared cache
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad((weights * got.logp).sum(), params), torch.autograd.grad((weights * expected_logp).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shared_pass_with_the_output_layer_on_scored_hidden_states_gives_the_same_logprobs_and_gradients(tokenizer, step):
    from l3m_lightning.logprobs import output_layer

    model = build_embedded_model(tokenizer, GQA, seed=0).train()
    prompt_ids, prompt_mask, parts = step
    shared = share_prompts(prompt_ids, prompt_mask, parts, tokenizer.pad_token_id)
    full = shared_prompt_token_logprobs(model, shared, with_hidden=True)
    seen: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    picked = shared_prompt_token_logprobs(model, shared, with_hidden=True, head=output_layer(model))
    assert sum(seen) == len(full.logp)  # the scored tokens' logits only
    torch.testing.assert_close(picked.logp, full.logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(picked.hidden, full.hidden, rtol=0, atol=0)
    assert torch.equal(picked.sequence, full.sequence)
    weights = torch.linspace(0.5, 2.0, len(full.logp))
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad((weights * picked.logp).sum(), params), torch.autograd.grad((weights * full.logp).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_head", [False, True])
@pytest.mark.parametrize("references_first", [True, False])
def test_shared_pass_is_exact_whether_or_not_the_references_ride_in_the_prompts_forward(tokenizer, step, references_first, with_head):
    """References first (one per prompt, in order): they follow their prompts in one forward, one call fewer.
    Samples first: every part on the prompts' cache. Both score the whole rows' tokens, with their gradients."""
    from l3m_lightning.logprobs import output_layer

    model = build_embedded_model(tokenizer, GQA, seed=0).train()
    prompt_ids, prompt_mask, parts = step
    parts = parts if references_first else parts[::-1]
    shared = share_prompts(prompt_ids, prompt_mask, parts, tokenizer.pad_token_id)
    assert shared.first_part_with_prompts is references_first
    calls: list[int] = []
    model.register_forward_hook(lambda _m, _args, _out: calls.append(1))
    got = shared_prompt_token_logprobs(model, shared, with_hidden=True, head=output_layer(model) if with_head else None)
    assert len(calls) == (2 if references_first else 3)
    whole = [padded_token_logprobs(model, rows, with_hidden=True) for rows, _ in parts]
    expected = torch.cat([w.logp for w in whole])
    torch.testing.assert_close(got.logp, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.hidden, torch.cat([w.hidden for w in whole]), rtol=1e-5, atol=1e-5)
    assert torch.equal(got.sequence, torch.cat([whole[0].sequence, whole[1].sequence + len(parts[0][1])]))
    weights = torch.linspace(0.5, 2.0, len(expected))
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad((weights * got.logp).sum(), params), torch.autograd.grad((weights * expected).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shared_layout_computes_each_prompt_once(tokenizer, step):
    prompt_ids, prompt_mask, parts = step
    shared = share_prompts(prompt_ids, prompt_mask, parts, tokenizer.pad_token_id)
    assert shared.tokens() == prompt_ids.numel() + 2 * 9 + 6 * 7  # prompts once, each part padded to its longest response
    assert shared.tokens() < int(parts[0][0][1].sum() + parts[1][0][1].sum())  # fewer than the rows' tokens


def test_rows_that_are_not_prompt_then_response_are_not_shared(tokenizer, step):
    prompt_ids, prompt_mask, ((sft, sft_of), samples) = step
    ids, mask, labels = (t.clone() for t in sft)
    ids[0, 2] += 1  # the row's prompt differs from the prompt it claims
    assert share_prompts(prompt_ids, prompt_mask, [((ids, mask, labels), sft_of), samples], tokenizer.pad_token_id) is None
    ids, mask, labels = (t.clone() for t in sft)
    labels[0, 6] = IGNORE_INDEX  # an unlabelled token right after the prompt
    assert share_prompts(prompt_ids, prompt_mask, [((ids, mask, labels), sft_of), samples], tokenizer.pad_token_id) is None


class _NoCache(torch.nn.Module):
    """Forgets the cache it is given: a model the shared pass would score wrongly."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, past_key_values=None, cache=None, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_check_catches_a_model_that_ignores_the_cache(tokenizer, step, dtype):
    model = build_embedded_model(tokenizer, GQA, seed=0).to(dtype)
    prompt_ids, prompt_mask, parts = step
    shared = share_prompts(prompt_ids, prompt_mask, parts, tokenizer.pad_token_id)
    assert sharing_matches_padding(model, shared, [rows for rows, _ in parts])
    assert not sharing_matches_padding(_NoCache(model), shared, [rows for rows, _ in parts])


def _module_and_step(tokenizer, **policy):
    from toy_problem import chat_batch, tiny_module

    from l3m_lightning.sampling import sample_rollouts

    module = tiny_module(policy=policy, sampling={"num_samples": 3, "max_new_tokens": 6}, constraints=[{"name": "length", "threshold": 2, "scale": 4}])
    batch = chat_batch(module.tokenizer)
    torch.manual_seed(0)
    rollouts = sample_rollouts(module.model, batch["prompt_input_ids"], batch["prompt_attention_mask"], 3, 6, module.stop_token_ids,
                               module.tokenizer.pad_token_id)
    return module, batch, rollouts


def test_the_module_shares_prompts_when_it_computes_fewer_positions(tokenizer):
    module, batch, rollouts = _module_and_step(tokenizer)
    sft = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    pg = (rollouts.input_ids, rollouts.attention_mask, rollouts.labels)
    layout = module.shared_prompt_layout(batch, sft, pg, rollouts)
    assert layout is not None and layout.tokens() < int(sft[1].sum() + pg[1].sum())
    got_sft, got_pg = module.policy_logprobs(batch, rollouts)
    torch.testing.assert_close(got_sft.sums(), padded_token_logprobs(module.model, sft).sums(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_pg.sums(), padded_token_logprobs(module.model, pg).sums(), rtol=1e-5, atol=1e-4)


def test_the_module_packs_when_sharing_would_compute_more(tokenizer, monkeypatch):
    import l3m_lightning.module as module_file
    from l3m_lightning.logprobs import SharedPrompt

    module, batch, rollouts = _module_and_step(tokenizer)
    sft = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    pg = (rollouts.input_ids, rollouts.attention_mask, rollouts.labels)
    monkeypatch.setattr(SharedPrompt, "tokens", lambda self: 10**9)
    assert module.shared_prompt_layout(batch, sft, pg, rollouts) is None
    monkeypatch.setattr(module_file, "shared_prompt_token_logprobs", lambda *a, **k: pytest.fail("shared pass taken"))
    module.policy_logprobs(batch, rollouts)


@pytest.mark.parametrize("policy", [{"share_prompts": False}, {"gradient_checkpointing": True}])
def test_sharing_is_off_when_switched_off_or_under_gradient_checkpointing(tokenizer, policy):
    module, batch, rollouts = _module_and_step(tokenizer, **policy)
    sft = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    pg = (rollouts.input_ids, rollouts.attention_mask, rollouts.labels)
    assert module.shared_prompt_layout(batch, sft, pg, rollouts) is None


def test_a_model_that_fails_the_check_is_scored_by_whole_rows_with_a_warning(tokenizer):
    module, batch, rollouts = _module_and_step(tokenizer)
    module.model = _NoCache(module.model)
    sft = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    pg = (rollouts.input_ids, rollouts.attention_mask, rollouts.labels)
    with pytest.warns(UserWarning, match="share_prompts.*whole row"):
        assert module.shared_prompt_layout(batch, sft, pg, rollouts) is None
    assert module.shared_prompt_layout(batch, sft, pg, rollouts) is None  # decided once
