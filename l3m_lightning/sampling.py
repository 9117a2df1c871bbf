"""Sampling responses from the policy and scoring their log-probabilities.

Generation is batched over left-padded prompts with the KV cache, K samples per prompt, and
stops each row at a stop token: by the lean loop of ``decoding.py`` (each prompt prefilled once
for its K samples), or by ``transformers.generate`` where that loop cannot run. The sampled sequences are then repacked
exactly like SFT rows — prompt + response, right-padded, prompt masked out — so one function
computes log-probabilities for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel

from l3m_lightning.constants import IGNORE_INDEX
from l3m_lightning.decoding import lean_decoding_supported, lean_sample


@dataclass
class Rollouts:
    """K sampled responses per prompt, samples of one prompt contiguous (``[B*K]`` rows)."""

    input_ids: torch.Tensor  # [N, T] prompt + response, right-padded
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T] response tokens (incl. EOS), IGNORE_INDEX elsewhere
    completion_ids: list[list[int]]  # response tokens without EOS, for constraints
    finished: torch.Tensor  # [N] bool: ended with EOS (False: cut at max_new_tokens)
    prompt_index: torch.Tensor  # [N] which prompt of the batch each sample answers
    group_size: int


@torch.no_grad()
def sample_rollouts(
    model: PreTrainedModel,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    num_samples: int,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    synced_gpus: bool | None = None,
    max_rows_per_call: int | None = None,
    min_new_tokens: int = 0,
    decoder: str = "lean",
    onednn: bool = True,
    cuda_graphs: bool = False,
) -> Rollouts:
    """Sample ``num_samples`` responses for each left-padded prompt; no gradient is recorded.

    ``max_rows_per_call`` bounds the sequences decoded at once (the KV cache grows with them): the
    prompts are decoded in chunks of ``max(1, max_rows_per_call // num_samples)``.

    ``synced_gpus=True`` keeps every rank running forward passes until all ranks' rows have stopped:
    required when parameters are sharded (FSDP1/FSDP2), where each forward all-gathers parameters
    collectively and a rank that stopped early would leave the others waiting. ``None`` lets
    transformers decide (it only recognises models it wrapped itself).

    ``eos_token_id`` may list several stop tokens (the tokenizer's EOS and the chat template's
    end-of-turn token, ``policy.stop_token_ids``): a row stops at the first of any of them.

    ``decoder="lean"`` samples with ``decoding.lean_sample`` where it can (not under lock-step
    ``synced_gpus``, not for models ``lean_decoding_supported`` rejects); otherwise ``generate``.
    Both sample the same distribution. ``onednn``: the lean decode step's large float32 CPU matmuls on
    oneDNN (``decoding.LlamaDecodeStep``), else ``F.linear``. ``cuda_graphs``: that decode step over a fixed
    window, one CUDA graph replayed per token on a GPU (``decoding.FixedWindowDecode``).
    """
    stop_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    chunk = len(prompt_input_ids) if not max_rows_per_call else max(1, max_rows_per_call // num_samples)
    chunks = list(zip(prompt_input_ids.split(chunk), prompt_attention_mask.split(chunk)))
    was_training = model.training
    model.eval()
    try:
        if decoder == "lean" and do_sample and not synced_gpus and lean_decoding_supported(model):
            pieces = [lean_sample(model, ids, mask, num_samples, max_new_tokens, stop_ids, pad_token_id, temperature=temperature,
                                  top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens, onednn=onednn, cuda_graphs=cuda_graphs)
                      for ids, mask in chunks]
        else:
            pieces = _generate(model, chunks, num_samples, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
                               do_sample, synced_gpus, min_new_tokens)
    finally:
        model.train(was_training)
    width = max(p.shape[1] for p in pieces)  # a chunk whose rows all hit EOS early is narrower
    new_tokens = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_token_id) for p in pieces])
    return pack_rollouts(prompt_input_ids, prompt_attention_mask, new_tokens, num_samples, eos_token_id, pad_token_id)


def _generate(model: PreTrainedModel, chunks: list[tuple[torch.Tensor, torch.Tensor]], num_samples: int, max_new_tokens: int,
              eos_token_id: int | list[int], pad_token_id: int, temperature: float, top_k: int, top_p: float, do_sample: bool,
              synced_gpus: bool | None, min_new_tokens: int) -> list[torch.Tensor]:
    """Each chunk's new tokens from ``transformers.generate``."""
    config = GenerationConfig(
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=top_k if do_sample else None,
        top_p=top_p if do_sample else None,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        num_return_sequences=num_samples,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    return [model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced_gpus)[:, ids.shape[1] :]
            for ids, mask in chunks]


def pack_rollouts(
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    new_tokens: torch.Tensor,
    num_samples: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
) -> Rollouts:
    """Cut each sample at its first stop token and lay prompt + response out right-padded.

    The stop token stays in the response's labels (its log-probability is what ending costs),
    also when it is the pad token, as for tokenizers whose pad is their EOS.
    """
    n = new_tokens.shape[0]
    prompt_index = torch.arange(n, device=new_tokens.device) // num_samples
    stop_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=new_tokens.device)
    is_eos = torch.isin(new_tokens, stop_ids)
    finished = is_eos.any(dim=1)
    first_eos = torch.where(finished, is_eos.int().argmax(dim=1), torch.full_like(finished, new_tokens.shape[1], dtype=torch.long))
    response_len = torch.where(finished, first_eos + 1, first_eos)  # EOS is part of the response when present
    prompt_len = prompt_attention_mask.sum(dim=1)[prompt_index]
    width = int((prompt_len + response_len).max())

    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long, device=new_tokens.device)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long, device=new_tokens.device)
    attention_mask = torch.zeros((n, width), dtype=torch.long, device=new_tokens.device)
    completion_ids: list[list[int]] = []
    for j in range(n):
        p, r = int(prompt_len[j]), int(response_len[j])
        prompt = prompt_input_ids[prompt_index[j], prompt_input_ids.shape[1] - p :]
        response = new_tokens[j, :r]
        input_ids[j, :p] = prompt
        input_ids[j, p : p + r] = response
        labels[j, p : p + r] = response
        attention_mask[j, : p + r] = 1
        completion_ids.append(new_tokens[j, : int(first_eos[j])].tolist())
    return Rollouts(input_ids, attention_mask, labels, completion_ids, finished, prompt_index, num_samples)

