"""What a real chat model needs that the embedded one never did: train mode after loading, stopping at
the chat template's end-of-turn token, and pad == EOS tokenizers keeping EOS in the labels."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from l3m_lightning.constants import IGNORE_INDEX
from l3m_lightning.embedded.model import build_embedded_model
from l3m_lightning.policy import load_policy, load_tokenizer, stop_token_ids
from l3m_lightning.sampling import pack_rollouts, sample_rollouts

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_tokenizer(path, pad_is_eos: bool = True, eos: str = "<|im_end|>") -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ChatML specials, saved to ``path``; SmolLM2-like when ``pad_is_eos``."""
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = "user assistant system hi hello what is the answer yes no two three".split()
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos, additional_special_tokens=specials[1:])
    if pad_is_eos:
        fast.pad_token = eos
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def test_a_pretrained_folder_loads_in_train_mode(tmp_path, tokenizer):
    folder = tmp_path / "policy"
    build_embedded_model(tokenizer, TINY, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = load_policy(str(folder), load_tokenizer(str(folder)))
    # from_pretrained returns eval mode; Lightning would keep every submodule that way
    assert all(m.training for m in model.modules())


def test_stop_tokens_include_the_templates_end_of_turn(tmp_path):
    tok = chatml_tokenizer(tmp_path / "tok", pad_is_eos=False, eos="<|endoftext|>")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != eot
    assert stop_token_ids(tok) == sorted({tok.eos_token_id, eot})


def test_stop_tokens_add_the_generation_configs_eos_ids(tmp_path, tokenizer):
    model = build_embedded_model(tokenizer, TINY, seed=0)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert stop_token_ids(tokenizer, model) == sorted({tokenizer.eos_token_id, 7})


def test_pad_equal_to_eos_keeps_eos_in_the_sampled_labels():
    eos = pad = 2
    prompt_ids, prompt_mask = torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long)
    new = torch.tensor([[7, 8, eos, pad], [9, eos, pad, pad]])
    rollouts = pack_rollouts(prompt_ids, prompt_mask, new, num_samples=2, eos_token_id=eos, pad_token_id=pad)
    assert rollouts.completion_ids == [[7, 8], [9]]
    assert rollouts.labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, eos]
    assert rollouts.labels[1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 9, eos, IGNORE_INDEX]
    assert rollouts.finished.tolist() == [True, True]


def test_any_of_several_stop_tokens_ends_a_sample():
    eos, eot, pad = 1, 3, 0
    prompt_ids, prompt_mask = torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.long)
    new = torch.tensor([[7, eot, 8, eos], [7, 8, eos, pad], [7, 8, 9, 9]])
    rollouts = pack_rollouts(prompt_ids, prompt_mask, new, num_samples=3, eos_token_id=[eos, eot], pad_token_id=pad)
    assert rollouts.completion_ids == [[7], [7, 8], [7, 8, 9, 9]]
    assert rollouts.finished.tolist() == [True, True, False]
    assert rollouts.labels[0].tolist()[1:3] == [7, eot]


@pytest.mark.parametrize("as_list", [False, True])
def test_sampling_stops_at_a_token_the_tokenizer_does_not_call_eos(tokenizer, as_list):
    torch.manual_seed(0)
    model = build_embedded_model(tokenizer, TINY, seed=0).eval()
    ids = torch.tensor([tokenizer("hello there", add_special_tokens=False)["input_ids"]])
    kwargs = dict(num_samples=1, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    free = sample_rollouts(model, ids, torch.ones_like(ids), eos_token_id=tokenizer.eos_token_id, **kwargs)
    free_tokens = free.completion_ids[0]
    assert len(free_tokens) >= 3, "the greedy continuation should not end at once"
    stop = free_tokens[2]
    first = free_tokens.index(stop)
    stops = [tokenizer.eos_token_id, stop] if as_list else stop
    cut = sample_rollouts(model, ids, torch.ones_like(ids), eos_token_id=stops, **kwargs)
    assert cut.completion_ids[0] == free_tokens[:first]
    assert cut.finished.tolist() == [True]


def test_references_end_at_the_templates_end_of_turn_too(tmp_path):
    from l3m_lightning.data import conversation_ids

    tok = chatml_tokenizer(tmp_path / "tok", pad_is_eos=False, eos="<|endoftext|>")
    tok.chat_template = CHATML.replace("'<|im_end|>' + '\n'", "'<|im_end|>' + ' hi\n'")  # a word after each turn's end
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    _, response = conversation_ids(tok, messages, stop_token_ids(tok))
    assert response == [tok.convert_tokens_to_ids("hello"), eot]  # what follows <|im_end|> is not a training target
    _, eos_only = conversation_ids(tok, messages)
    assert eos_only[-1] != eot  # trimming at EOS alone (absent from this template) would keep it
