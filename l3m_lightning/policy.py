"""Load the policy and its tokenizer: the embedded default, or any Hugging Face causal LM.

``"embedded"`` builds the project's small offline model; anything else is passed to
``AutoModelForCausalLM`` / ``AutoTokenizer`` after ``constraints.model_source.resolve_model_path``
(a hub name, a local ``save_pretrained`` folder, ``pkg:<module>/<file>``, or a ``.gguf`` file,
dequantised once and cached as a plain folder), so every path ends in the same objects and the
rest of the library cannot tell them apart.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from constraints.base import ConfigError
from constraints.model_source import ensure_pad_token, load_pretrained

EMBEDDED = "embedded"
log = logging.getLogger(__name__)

# For base models that ship no chat template: plain "role: content" turns, EOS after each.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, option: str = "model.policy.name_or_path", allow_key: str = "model.policy.trust_remote_code"
) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and a chat template guaranteed.

    ``option`` / ``allow_key`` are the config keys a one-line error names: the one that gave
    ``name_or_path``, and the one that allows custom code (see ``pretrained_source``).
    """
    if name_or_path == EMBEDDED:
        from l3m_lightning.embedded.tokenizer import embedded_tokenizer_path

        name_or_path = str(embedded_tokenizer_path())
    tokenizer = load_pretrained(AutoTokenizer, name_or_path, option, trust_remote_code, allow_key)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer '{name_or_path}' has no eos_token; set one so sampling can stop")
    ensure_pad_token(tokenizer)
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
    trust_remote_code: bool = False,
    option: str = "model.policy.name_or_path",
    allow_key: str = "model.policy.trust_remote_code",
    config_key: str = "model.policy.config",
) -> PreTrainedModel:
    """The causal LM to fine-tune, in train mode. ``model_config`` sizes the embedded model or overrides a real one's config.

    A folder that needs custom code (an ``auto_map``) fails before anything is imported unless
    ``trust_remote_code``. ``option``, ``allow_key`` and ``config_key`` are the config keys errors name: the model's,
    the one allowing custom code, and the one giving ``model_config``.

    ``from_pretrained`` returns a model in eval mode; Lightning keeps submodules' modes as it finds
    them, so without ``train()`` dropout would stay off for the whole fit (and Lightning warns).
    """
    if name_or_path == EMBEDDED:
        from l3m_lightning.embedded.model import build_embedded_model

        return build_embedded_model(tokenizer, model_config, seed=seed).train()
    kwargs: dict[str, Any] = dict(model_config or {})
    if "trust_remote_code" in kwargs:
        raise ConfigError(f"{config_key}: trust_remote_code is not a config override; set {allow_key} instead")
    if torch_dtype is not None:
        kwargs["dtype"] = getattr(torch, torch_dtype)
    return load_pretrained(AutoModelForCausalLM, name_or_path, option, trust_remote_code, allow_key, **kwargs).train()


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """Every token that ends an assistant turn: EOS, the generation config's EOS ids, and the chat template's end-of-turn.

    Chat models often end a turn with a token other than the tokenizer's EOS (Llama 3's
    ``<|eot_id|>``); sampling must stop there, or responses run on into a made-up next turn.
    The end-of-turn token is read off the template: the first special token after the assistant's text.
    """
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([configured] if isinstance(configured, int) else list(configured or []))
    ids.update(template_end_of_turn_ids(tokenizer))
    return sorted(i for i in ids if i is not None)


def template_end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token the chat template writes right after an assistant message (empty if none)."""
    marker = "l3m end of turn marker"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that needs other roles or fields: fall back to EOS alone
        return []
    tail = text[text.rfind(marker) + len(marker) :] if marker in text else ""
    special = set(tokenizer.all_special_ids) | {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return [token_id]
    return []


def apply_lora(model: PreTrainedModel, lora: dict[str, Any]) -> PreTrainedModel:
    """Wrap ``model`` with PEFT LoRA adapters (``pip install .[peft]``); only the adapters train.

    ``lora`` holds ``peft.LoraConfig`` fields, e.g. ``{r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj]}``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("model.policy.lora needs PEFT: pip install 'l3m-lightning[peft]'") from err
    settings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **lora}
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
