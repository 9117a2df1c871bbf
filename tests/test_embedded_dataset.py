"""Tests for the embedded (offline, generated) default dataset."""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from l3m_lightning.embedded.dataset import (
    VERBOSE_FIRST_WORDS,
    corpus_text,
    generate_pairs,
    generate_rows,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows():
    return generate_rows(2000, seed=0)


def _words(text: str) -> int:
    return len(text.split())


def test_deterministic_in_process():
    assert generate_rows(300, seed=7) == generate_rows(300, seed=7)
    assert generate_pairs(300, seed=7) == generate_pairs(300, seed=7)


def test_deterministic_across_processes():
    """No reliance on hash(): a fresh interpreter with another PYTHONHASHSEED agrees."""
    code = ("import json; from l3m_lightning.embedded.dataset import generate_rows; "
            "print(json.dumps(generate_rows(200, seed=3)))")
    env = dict(os.environ, PYTHONHASHSEED="12345",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == generate_rows(200, seed=3)


def test_seed_changes_order_and_styles():
    a, b = generate_rows(500, seed=0), generate_rows(500, seed=1)
    assert a != b
    assert [r["style"] for r in a] != [r["style"] for r in b]
    # Same prompt set (facts do not depend on the seed), different order.
    pa = [r["messages"][0]["content"] for r in a]
    pb = [r["messages"][0]["content"] for r in b]
    assert pa != pb and sorted(pa) == sorted(pb)


def test_rows_well_formed(rows):
    assert len(rows) == 2000
    for r in rows:
        assert set(r) == {"messages", "style", "topic"}
        assert r["style"] in ("concise", "verbose")
        assert isinstance(r["topic"], str) and r["topic"]
        msgs = r["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        for m in msgs:
            assert set(m) == {"role", "content"}
            assert isinstance(m["content"], str) and m["content"].strip() == m["content"] and m["content"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_styles_roughly_balanced(seed):
    styles = collections.Counter(r["style"] for r in generate_rows(2000, seed=seed))
    frac = styles["concise"] / 2000
    assert 0.40 <= frac <= 0.60, styles


def test_length_targets_and_ratio():
    pairs = generate_pairs(2000, seed=0)
    concise = [_words(p["concise"]) for p in pairs]
    verbose = [_words(p["verbose"]) for p in pairs]
    assert all(1 <= n <= 5 for n in concise)
    assert all(25 <= n <= 45 for n in verbose)
    assert sum(verbose) / len(verbose) >= 5 * sum(concise) / len(concise)


def test_row_lengths_by_style(rows):
    by = collections.defaultdict(list)
    for r in rows:
        by[r["style"]].append(_words(r["messages"][1]["content"]))
    mean = {k: sum(v) / len(v) for k, v in by.items()}
    assert mean["verbose"] >= 5 * mean["concise"], mean


def test_prompts_unique(rows):
    prompts = [r["messages"][0]["content"] for r in rows]
    assert len(set(prompts)) == len(prompts)


def test_5000_prompts():
    rows5 = generate_rows(5000, seed=0)
    assert len(rows5) == 5000
    assert len({r["messages"][0]["content"] for r in rows5}) == 5000
    # The first 2000 prompts of the pool are shared (pool does not depend on num_prompts).
    assert {r["messages"][0]["content"] for r in generate_rows(2000, seed=0)} <= \
        {r["messages"][0]["content"] for r in rows5}


def test_first_word_identifies_style(rows):
    """A classifier that only sees the answer's first word: fit on half, evaluate on the other half."""
    first = [(r["messages"][1]["content"].split()[0], r["style"]) for r in rows]
    train, test = first[:1000], first[1000:]
    votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for w, s in train:
        votes[w][s] += 1
    predict = {w: c.most_common(1)[0][0] for w, c in votes.items()}
    acc = sum(predict.get(w, "concise") == s for w, s in test) / len(test)
    assert acc >= 0.95, acc
    # And the documented rule holds exactly.
    for w, s in first:
        assert (w in VERBOSE_FIRST_WORDS) == (s == "verbose")


def test_pairs_agree_with_rows():
    rows_, pairs = generate_rows(1000, seed=5), generate_pairs(1000, seed=5)
    assert len(rows_) == len(pairs)
    for r, p in zip(rows_, pairs):
        assert set(p) == {"prompt", "concise", "verbose", "topic"}
        assert r["messages"][0]["content"] == p["prompt"]
        assert r["messages"][1]["content"] == p[r["style"]]
        assert r["topic"] == p["topic"]
        assert p["concise"] != p["verbose"]


def test_topic_diversity(rows):
    topics = collections.Counter(r["topic"] for r in rows)
    assert len(topics) >= 10
    assert max(topics.values()) / len(rows) < 0.25, topics


def test_corpus_text_covers_both_answers(rows):
    texts = list(corpus_text(rows[:300]))
    assert len(texts) == 3 * 300
    s = set(texts)
    by_prompt = {p["prompt"]: p for p in generate_pairs(2000, seed=0)}
    for r in rows[:300]:
        p = by_prompt[r["messages"][0]["content"]]
        assert {p["prompt"], p["concise"], p["verbose"]} <= s
    assert list(corpus_text(generate_pairs(50, seed=0))) == [
        t for p in generate_pairs(50, seed=0) for t in (p["prompt"], p["concise"], p["verbose"])]


def test_vocabulary_modest():
    words = {w for p in generate_pairs(2000, seed=0)
             for t in (p["prompt"], p["concise"], p["verbose"])
             for w in re.findall(r"[A-Za-z0-9'-]+", t.lower())}
    assert len(words) <= 3000, len(words)


def test_invalid_sizes():
    with pytest.raises(ValueError):
        generate_rows(0)
    with pytest.raises(ValueError):
        generate_pairs(10**6)
