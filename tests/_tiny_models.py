"""Tiny random-init sequence classifiers and word-level tokenizers, built locally and saved with save_pretrained.

No hub access: the tokenizer is made with the ``tokenizers`` library from a word list, the model
from a config, and both are written to a folder that ``from_pretrained`` then loads by path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

WORDS = (
    "human assistant : ? ! . , the a an i you it is are was be to of and or not no yes please thanks sorry "
    "help how what why can do make tell me about good bad safe kind rude harm hurt steal lie cook bake "
    "cake bread garden plant water walk dog cat book read write story poem song friend family day night"
).split()


def build_tokenizer(path: Path, words: Iterable[str] = WORDS, kind: str = "bert", chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer. ``bert``: [CLS] text [SEP] and a [PAD]; ``gpt2``: no specials but an eos, no pad."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if kind == "bert" else ["<unk>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[1] if kind == "bert" else "<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", model_max_length=128
        )
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", model_max_length=128)
    if chat_template is not None:
        fast.chat_template = chat_template
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def build_reward_model(path: Path, kind: str = "bert", seed: int = 0, chat_template: str | None = None, hidden: int = 32, dropout: float = 0.0) -> Path:
    """Save a tiny random-init ``*ForSequenceClassification`` (num_labels=1) and its tokenizer to ``path``."""
    tokenizer = build_tokenizer(path, kind=kind, chat_template=chat_template)
    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
            max_position_embeddings=128, num_labels=1, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = BertForSequenceClassification(config)
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=hidden, n_layer=2, n_head=2, n_positions=128, num_labels=1,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
            pad_token_id=None,
        )
        model = GPT2ForSequenceClassification(config)
    model.save_pretrained(path)
    return path
