"""A byte-level BPE tokenizer trained locally on the embedded corpus (seconds), cached on disk.

No tokenizer can be downloaded on an offline machine, so the embedded default trains its own and
saves it in the Hugging Face format: afterwards it loads with ``AutoTokenizer`` like any other.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from l3m_lightning.embedded.dataset import corpus_text, generate_rows

# Part of the cache key, with a hash of the code that defines the corpus and the training (below):
# editing either trains a fresh tokenizer instead of silently reusing a stale one.
TOKENIZER_VERSION = "v1"
VOCAB_SIZE = 2048
PAD, EOS = "<|pad|>", "<|end|>"
SPECIAL_TOKENS = [PAD, EOS, "<|system|>", "<|user|>", "<|assistant|>"]
# Role tags and <|end|> are single special tokens, so the prompt's tokens are always a prefix of
# the prompt+response tokens, and the response's last token is EOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_root() -> Path:
    """Where embedded artefacts live: ``$L3M_CACHE`` or ``~/.cache/l3m_lightning``."""
    return Path(os.environ.get("L3M_CACHE", Path.home() / ".cache" / "l3m_lightning"))


def embedded_tokenizer_path() -> Path:
    """Train (first call) and return the directory of the embedded tokenizer."""
    target = cache_root() / f"embedded-tokenizer-{TOKENIZER_VERSION}-{_source_hash()}"
    if (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir and rename into place, so concurrent ranks never see half a tokenizer.
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=target.parent))
    try:
        _train(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _source_hash() -> str:
    """Short hash of dataset.py and this file: the corpus, vocabulary size, special tokens, template."""
    from l3m_lightning.embedded import dataset

    digest = hashlib.sha256()
    for source in (Path(dataset.__file__), Path(__file__)):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:10]


def _train(out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rows = generate_rows(num_prompts=5000, seed=0)
    tok.train_from_iterator(corpus_text(rows), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE)
    hf.save_pretrained(out_dir)
