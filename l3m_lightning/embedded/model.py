"""The embedded default policy: a small Llama-style causal LM with random init.

It is a plain ``LlamaForCausalLM``, so everything downstream (generation, ``save_pretrained``,
FSDP wrapping) is the same code path as for a real Hugging Face model.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

EMBEDDED_MODEL_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "attention_dropout": 0.0,
}


def build_embedded_model(tokenizer: PreTrainedTokenizerBase, overrides: dict[str, Any] | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama whose vocabulary matches ``tokenizer``; ``overrides`` resize it."""
    settings = {**EMBEDDED_MODEL_DEFAULTS, **(overrides or {})}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **settings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
