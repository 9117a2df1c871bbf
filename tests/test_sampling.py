import pytest
import torch

from l3m_lightning.constants import IGNORE_INDEX
from l3m_lightning.embedded.model import build_embedded_model
from l3m_lightning.logprobs import padded_token_logprobs
from l3m_lightning.sampling import pack_rollouts, sample_rollouts

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_embedded_model(tokenizer, TINY, seed=0).eval()


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def test_left_padded_batch_matches_one_by_one_greedy(model, tokenizer):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in ["What is 2 plus 2?", "Name three primary colours, please, and say why.", "Hi"]]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    kwargs = dict(num_samples=1, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    batched = sample_rollouts(model, *_left_pad(prompt_ids, tokenizer.pad_token_id), **kwargs)
    for i, p in enumerate(prompt_ids):
        single = sample_rollouts(model, *_left_pad([p], tokenizer.pad_token_id), **kwargs)
        assert batched.completion_ids[i] == single.completion_ids[0]


def test_pack_rollouts_cuts_at_eos_and_masks_prompt():
    eos, pad = 1, 0
    prompt_ids = torch.tensor([[0, 7, 8], [5, 6, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    new = torch.tensor([[4, eos, 3], [4, 4, 4], [eos, pad, pad], [2, 3, eos]])  # K=2 per prompt
    r = pack_rollouts(prompt_ids, prompt_mask, new, num_samples=2, eos_token_id=eos, pad_token_id=pad)
    assert r.prompt_index.tolist() == [0, 0, 1, 1]
    assert r.completion_ids == [[4], [4, 4, 4], [], [2, 3]]
    assert r.finished.tolist() == [True, False, True, True]
    assert r.input_ids[0].tolist()[:4] == [7, 8, 4, eos] and r.attention_mask[0].tolist()[:5] == [1, 1, 1, 1, 0]
    assert r.labels[0].tolist()[:4] == [IGNORE_INDEX, IGNORE_INDEX, 4, eos]
    assert r.labels[2].tolist()[:4] == [IGNORE_INDEX] * 3 + [eos]


def test_padded_token_logprobs_match_a_manual_forward(model):
    ids = torch.tensor([[3, 10, 11, 12, 1], [3, 10, 1, 0, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    labels[:, :2] = IGNORE_INDEX
    scored = padded_token_logprobs(model, (ids, mask, labels), with_hidden=True)
    with torch.no_grad():
        out = model(input_ids=ids[:1], output_hidden_states=True)
    full = torch.log_softmax(out.logits[0], dim=-1)
    expected = sum(full[t - 1, ids[0, t]] for t in range(2, 5))
    assert scored.counts().tolist() == [3, 1] and scored.positions().tolist() == [0, 1, 2, 0]
    assert scored.sums()[0].item() == pytest.approx(expected.item(), abs=1e-5)
    torch.testing.assert_close(scored.hidden[:3], out.hidden_states[-1][0, 1:4])  # the states tokens 2..4 were predicted from


@pytest.mark.parametrize("num_samples,max_rows", [(1, 1), (1, 3), (1, 100)])  # greedy allows K = 1 only
def test_generation_micro_batches_give_the_same_greedy_tokens(model, tokenizer, num_samples, max_rows):
    prompts = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in ["What is 2 plus 2?", "Name three primary colours.", "Hi", "Why?"]]
    ids, mask = _left_pad(prompts, tokenizer.pad_token_id)
    kwargs = dict(num_samples=num_samples, max_new_tokens=9, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    whole = sample_rollouts(model, ids, mask, **kwargs)
    chunked = sample_rollouts(model, ids, mask, max_rows_per_call=max_rows, **kwargs)
    assert chunked.completion_ids == whole.completion_ids and len(whole.completion_ids) == 4 * num_samples
    assert torch.equal(chunked.input_ids, whole.input_ids) and torch.equal(chunked.finished, whole.finished)


def test_micro_batches_that_stop_early_are_padded_back_to_one_width(model, tokenizer):
    """A chunk whose rows all hit EOS is narrower than the rest; its rows still pack correctly."""
    eos = tokenizer.eos_token_id
    ids, mask = _left_pad([[5, 6], [7, 8]], tokenizer.pad_token_id)
    from unittest import mock

    outputs = iter([torch.tensor([[5, 6, 9, eos]]), torch.tensor([[7, 8, 9, 9, 9, 9]])])
    with mock.patch.object(model, "generate", side_effect=lambda **kw: next(outputs)):
        r = sample_rollouts(model, ids, mask, num_samples=1, max_new_tokens=4, eos_token_id=eos,
                            pad_token_id=tokenizer.pad_token_id, max_rows_per_call=1, decoder="generate")
    assert r.completion_ids == [[9], [9, 9, 9, 9]] and r.finished.tolist() == [True, False]
