"""How much held-out perplexity must a length constraint cost on the embedded data?

    python experiments/length_floor.py                 # bounds 10, 9, 8, 7 (tokens)
    python experiments/length_floor.py --at-most 10 7.2

Each embedded prompt has a concise and a verbose answer, drawn with p = 1/2. A policy that keeps
SFT's wording and only re-weights the two styles, subject to a bound on its mean length, minimises
the held-out cross-entropy at π_x(y) = p(y|x) / (ν_x + λ·len(y)) (stationarity of
CE + λ(E_π[len] − L) + Σ_x ν_x(Σ_y π_x(y) − 1)). Its extra negative log-likelihood on the held-out
references, over their token count, is a floor for the perplexity ratio of `length_table.py`'s
concise run: a measured ratio above it is lost learning, not the price of the constraint.
Writes experiments/results/length_floor.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402

from l3m_lightning.data import ChatDataModule  # noqa: E402
from l3m_lightning.embedded.dataset import generate_pairs  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "length_floor.json"


def held_out_answers(max_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Concise and verbose answer lengths (tokens, EOS not counted) of each held-out prompt, whether
    its reference is the verbose one, and the references' scored token count (what perplexity averages over)."""
    data = ChatDataModule(dataset="embedded", tokenizer="embedded", max_val_rows=max_rows)
    data.setup("test")
    pairs = {p["prompt"]: p for p in generate_pairs(data.hparams.embedded_num_prompts, data.hparams.split_seed)}
    count = lambda text: len(data.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    concise, verbose, is_verbose = [], [], []
    test = data.splits["test"]
    for prompt_text, response_text in zip(test["prompt_text"], test["response_text"]):
        pair = pairs[max((q for q in pairs if q in prompt_text), key=len)]  # the templated prompt contains the question
        concise.append(count(pair["concise"]))
        verbose.append(count(pair["verbose"]))
        is_verbose.append(response_text.strip() == pair["verbose"].strip())
    tokens = sum(len(ids) for ids in test["response_ids"])
    return np.array(concise, float), np.array(verbose, float), np.array(is_verbose), tokens


def bisect(f, lo: float, hi: float, iterations: int = 200) -> float:
    """The root of an increasing-or-decreasing f on [lo, hi] by bisection (no scipy needed)."""
    sign_lo = f(lo) > 0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if (f(mid) > 0) == sign_lo else (lo, mid)
    return 0.5 * (lo + hi)


def verbose_probability(lam: float, concise: np.ndarray, verbose: np.ndarray) -> np.ndarray:
    """π_x(verbose) at multiplier λ: ν_x solves ½/(ν + λ·l_c) + ½/(ν + λ·l_v) = 1."""
    out = np.empty(len(concise))
    for i, (lc, lv) in enumerate(zip(concise, verbose)):
        nu = bisect(lambda nu: 0.5 / (nu + lam * lc) + 0.5 / (nu + lam * lv) - 1, -lam * lc + 1e-12, 1 + lam * lv)
        out[i] = 0.5 / (nu + lam * lv)
    return out


def floor(bound: float, concise: np.ndarray, verbose: np.ndarray, is_verbose: np.ndarray, tokens: int) -> dict:
    mean_length = lambda lam: float(((1 - (p := verbose_probability(lam, concise, verbose))) * concise + p * verbose).mean())  # noqa: E731
    lam = 0.0 if mean_length(0.0) <= bound else bisect(lambda lam: mean_length(lam) - bound, 1e-9, 1e3)
    p = verbose_probability(lam, concise, verbose)
    extra = float(np.where(is_verbose, np.log(0.5 / p), np.log(0.5 / (1 - p))).sum())
    return {"bound": bound, "p_verbose": float(p.mean()), "extra_nll_nats": extra, "tokens": tokens,
            "ppl_ratio_floor": math.exp(extra / tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at-most", type=float, nargs="*", default=[10.0, 9.0, 8.0, 7.0], help="length bounds (tokens)")
    parser.add_argument("--max-rows", type=int, default=100, help="held-out prompts (length_table.py uses 100)")
    args = parser.parse_args()
    concise, verbose, is_verbose, tokens = held_out_answers(args.max_rows)
    print(f"{len(concise)} held-out prompts: concise answers {concise.mean():.1f} tokens, verbose {verbose.mean():.1f}; "
          f"{int(is_verbose.sum())} verbose references, {tokens} scored tokens")
    rows = [floor(bound, concise, verbose, is_verbose, tokens) for bound in args.at_most]
    print("| mean length ≤ | P(verbose) | extra NLL (nats) | perplexity ratio floor |\n| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['bound']:g} | {r['p_verbose']:.3f} | {r['extra_nll_nats']:.1f} | {r['ppl_ratio_floor']:.4f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
