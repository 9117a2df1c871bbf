"""The lean decode step's two kernels on this machine (its matmuls, ``F.linear`` against oneDNN, and its draw), and the training pass's pick of scored tokens.

    OMP_NUM_THREADS=2 python bench/decode_kernels.py          # ~1 min on 2 CPU cores

* matmuls: a decode step multiplies a few rows (``--rows``) by every weight matrix of the model.
  For each weight shape, ``--copies`` distinct matrices are multiplied in turn, as a step walks
  through its layers (so a large model's weights come from memory, not cache): ``F.linear`` (MKL's
  sgemm on x86) against ``decoding.onednn_linear``, per matrix and as the GB/s of weights read;
  ``chosen`` is what ``LlamaDecodeStep`` takes for that shape (``ONEDNN_MIN_WEIGHT_ELEMENTS``).
* the draw: ``decoding.inverse_cdf_draw`` with one float64 CDF (``block=0``) against two levels
  (``block=CDF_BLOCK``), per token for N rows of a V-entry vocabulary; ``chosen`` is the automatic pick.
* holding back stop tokens under ``min_new_tokens``: transformers' processor (what the sampler ran
  before ``bcc4137``) against the sampler's one ``index_fill``, per token for N rows of a V-entry vocabulary.
* the pick: the policy pass's log-probabilities of the scored tokens, forward and backward, from a
  ``[rows, positions, vocabulary]`` logits tensor with 80% of its positions scored: boolean
  indexing (``logits[scored]``, before ``531b68b``) against ``logprobs.pick`` (``index_select``,
  what ``logprobs`` uses). Shapes: the embedded step's samples (16 x 32 x 2,048) and a SmolLM2
  step's (8 x 128 x 49,152).

Prints a table and writes ``bench/results/decode_kernels.json`` (``--out``). Shapes: the 49M
bench config's projections (576x576, 1536x576, 576x1536), SmolLM2-135M's output layer (49152x576),
the embedded model's (2048x128) and a small projection (128x128).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from l3m_lightning import decoding, logprobs  # noqa: E402

#: (name, out_features, in_features, distinct copies): the weights a decode step walks through
SHAPES = (
    ("49M q/k/v/o", 576, 576, 48),
    ("49M gate/up", 1536, 576, 24),
    ("49M down", 576, 1536, 12),
    ("SmolLM2 lm_head", 49152, 576, 2),
    ("embedded lm_head", 2048, 128, 4),
    ("embedded 128x128", 128, 128, 16),
)
VOCABS = ((2048, 16), (49152, 8), (49152, 16))
#: (name, rows, positions, vocabulary): logits whose scored tokens a training pass picks
LOGITS = (("embedded samples", 16, 32, 2048), ("SmolLM2 samples", 8, 128, 49152))


def median_us(fn, repeats: int, per_call: int = 1) -> float:
    """Median over ``repeats`` timed calls (after 5 untimed), in microseconds per ``per_call`` unit."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / per_call * 1e6


def matmul_rows(rows: int, repeats: int) -> list[dict]:
    out = []
    for name, n_out, n_in, copies in SHAPES:
        x = torch.randn(rows, n_in)
        weights = [torch.randn(n_out, n_in) for _ in range(copies)]
        linear = median_us(lambda: [F.linear(x, w) for w in weights], repeats, copies)
        onednn = median_us(lambda: [decoding.onednn_linear(x, w, None) for w in weights], repeats, copies)
        mb = n_out * n_in * 4 / 1e6
        chosen = "oneDNN" if n_out * n_in >= decoding.ONEDNN_MIN_WEIGHT_ELEMENTS else "F.linear"
        out.append({"shape": name, "weight": [n_out, n_in], "rows": rows, "f_linear_us": linear, "onednn_us": onednn,
                    "f_linear_gb_s": mb / linear * 1e3, "onednn_gb_s": mb / onednn * 1e3, "speedup": linear / onednn, "chosen": chosen})
    return out


def draw_rows(repeats: int) -> list[dict]:
    out = []
    for vocab, n in VOCABS:
        probs = torch.softmax(torch.randn(n, vocab) * 3, dim=-1)
        flat = median_us(lambda: decoding.inverse_cdf_draw(probs, 0), repeats)
        blocks = median_us(lambda: decoding.inverse_cdf_draw(probs, decoding.CDF_BLOCK), repeats)
        chosen = "one CDF" if vocab <= decoding.FLAT_CDF_MAX_VOCAB else f"blocks of {decoding.CDF_BLOCK}"
        out.append({"vocab": vocab, "rows": n, "one_cdf_us": flat, "two_level_us": blocks, "speedup": flat / blocks, "chosen": chosen})
    return out


def hold_back_rows(repeats: int) -> list[dict]:
    """``min_new_tokens`` for one token: transformers' processor in a ``LogitsProcessorList`` (what the sampler ran
    before ``bcc4137``) against the sampler's one masking op; the same scores either way."""
    from transformers.generation.logits_process import LogitsProcessorList, MinNewTokensLengthLogitsProcessor

    out = []
    for vocab, n in VOCABS:
        logits = torch.randn(n, vocab)
        stop_ids = [vocab - 1, vocab - 2]
        processors = LogitsProcessorList([MinNewTokensLengthLogitsProcessor(20, 32, stop_ids, device="cpu")])
        so_far = torch.empty(n, 25, dtype=torch.long)  # the processor reads the sequence's length only
        stops = torch.tensor(stop_ids)
        if not torch.equal(processors(so_far, logits), logits.index_fill(-1, stops, -math.inf)):
            raise SystemExit("the masking op and transformers' processor disagree")
        hf = median_us(lambda: processors(so_far, logits), repeats)
        fill = median_us(lambda: logits.index_fill(-1, stops, -math.inf), repeats)
        out.append({"vocab": vocab, "rows": n, "processor_us": hf, "index_fill_us": fill, "speedup": hf / fill})
    return out


def pick_rows(repeats: int) -> list[dict]:
    out = []
    for name, rows, positions, vocab in LOGITS:
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(rows, positions, vocab, generator=g)
        targets = torch.randint(0, vocab, (rows, positions), generator=g)
        scored = torch.rand(rows, positions, generator=g) < 0.8

        def boolean() -> None:
            x = logits.detach().requires_grad_()
            torch.log_softmax(x[scored], dim=-1).gather(-1, targets[scored].unsqueeze(-1)).sum().backward()

        def index_select() -> None:
            x = logits.detach().requires_grad_()
            at = logprobs.scored_positions(scored)
            logprobs.target_logprobs(logprobs.pick(x, at), targets.reshape(-1)[at]).sum().backward()

        times = max(3, repeats * 2048 // vocab)  # the large vocabulary's pass takes ~0.3 s
        boolean_us, select_us = median_us(boolean, times), median_us(index_select, times)
        out.append({"logits": name, "shape": [rows, positions, vocab], "boolean_us": boolean_us, "index_select_us": select_us,
                    "speedup": boolean_us / select_us})
    return out


def table(matmuls: list[dict], draws: list[dict], holds: list[dict], picks: list[dict]) -> str:
    lines = [f"{'matmul':<18}{'weight':>12}{'rows':>6}{'F.linear us':>13}{'oneDNN us':>11}{'GB/s':>13}{'speed-up':>10}  chosen"]
    for r in matmuls:
        gbs = f"{r['f_linear_gb_s']:.1f}/{r['onednn_gb_s']:.1f}"
        lines.append(f"{r['shape']:<18}{'x'.join(map(str, r['weight'])):>12}{r['rows']:>6}{r['f_linear_us']:>13.1f}{r['onednn_us']:>11.1f}"
                     f"{gbs:>13}{r['speedup']:>9.2f}x  {r['chosen']}")
    lines += ["", f"{'draw':<18}{'vocab':>12}{'rows':>6}{'one CDF us':>13}{'2-level us':>11}{'':>13}{'speed-up':>10}  chosen"]
    for r in draws:
        lines.append(f"{'inverse CDF':<18}{r['vocab']:>12}{r['rows']:>6}{r['one_cdf_us']:>13.1f}{r['two_level_us']:>11.1f}{'':>13}"
                     f"{r['speedup']:>9.2f}x  {r['chosen']}")
    lines += ["", f"{'min_new_tokens':<18}{'vocab':>12}{'rows':>6}{'processor us':>13}{'mask us':>11}{'':>13}{'speed-up':>10}"]
    for r in holds:
        lines.append(f"{'hold back stops':<18}{r['vocab']:>12}{r['rows']:>6}{r['processor_us']:>13.1f}{r['index_fill_us']:>11.1f}{'':>13}"
                     f"{r['speedup']:>9.2f}x")
    lines += ["", f"{'pick, fwd+bwd':<18}{'logits':>16}{'boolean ms':>12}{'index_select ms':>17}{'speed-up':>10}"]
    for r in picks:
        lines.append(f"{r['logits']:<18}{'x'.join(map(str, r['shape'])):>16}{r['boolean_us'] / 1e3:>12.2f}{r['index_select_us'] / 1e3:>17.2f}"
                     f"{r['speedup']:>9.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 8], help="rows a decode step multiplies (B x K)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "decode_kernels.json"))
    args = parser.parse_args(argv)
    if not decoding.onednn_available():
        sys.exit("this torch build has no oneDNN matmul (torch.ops.mkldnn._linear_pointwise): nothing to compare")
    matmuls = [r for rows in args.rows for r in matmul_rows(rows, args.repeats)]
    draws = draw_rows(args.repeats * 5)
    holds = hold_back_rows(args.repeats * 5)
    picks = pick_rows(args.repeats)
    text = table(matmuls, draws, holds, picks)
    print(text)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"meta": {"date": date.today().isoformat(), "commit": commit, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "platform": platform.platform(), "command": "python bench/decode_kernels.py " + " ".join(argv or sys.argv[1:])},
              "matmuls": matmuls, "draws": draws, "hold_back": holds, "picks": picks, "table": text}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
