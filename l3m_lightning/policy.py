"""Load the policy and its tokenizer: the embedded default, or any Hugging Face causal LM.

``"embedded"`` builds the project's small offline model; anything else is passed to
``AutoModelForCausalLM`` / ``AutoTokenizer`` (a hub name or a local ``save_pretrained`` folder),
so both paths end in the same objects and the rest of the library cannot tell them apart.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED = "embedded"
log = logging.getLogger(__name__)

# For base models that ship no chat template: plain "role: content" turns, EOS after each.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and a chat template guaranteed."""
    if name_or_path == EMBEDDED:
        from l3m_lightning.embedded.tokenizer import embedded_tokenizer_path

        name_or_path = str(embedded_tokenizer_path())
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer '{name_or_path}' has no eos_token; set one so sampling can stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer '%s' has no chat template; using a plain 'role: content' template", name_or_path)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def load_policy(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase,
    model_config: dict[str, Any] | None = None,
    torch_dtype: str | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """The causal LM to fine-tune. ``model_config`` sizes the embedded model or overrides a real one's config."""
    if name_or_path == EMBEDDED:
        from l3m_lightning.embedded.model import build_embedded_model

        return build_embedded_model(tokenizer, model_config, seed=seed)
    kwargs: dict[str, Any] = dict(model_config or {})
    if torch_dtype is not None:
        kwargs["dtype"] = getattr(torch, torch_dtype)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def apply_lora(model: PreTrainedModel, lora: dict[str, Any]) -> PreTrainedModel:
    """Wrap ``model`` with PEFT LoRA adapters (``pip install .[peft]``); only the adapters train.

    ``lora`` holds ``peft.LoraConfig`` fields, e.g. ``{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("model.lora needs PEFT: pip install 'l3m-lightning[peft]'") from err
    settings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **lora}
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
