"""Where does a constrained run's extra held-out perplexity go? Two checkpoints, token by token.

    python experiments/token_gap.py runs/length_table/sft/checkpoints/last.ckpt \
        runs/length_table/length-concise/checkpoints/last.ckpt [--top 15]

Scores the embedded held-out references under both policies and splits the constrained run's extra
negative log-likelihood into: each reference's first token (where the answer style is chosen), its
EOS, and the tokens in between binned by how sure the *first* (reference) policy is of them. The
probability the constrained policy leaves on EOS inside an answer is reported apart: mass moved to
stopping early is the constraint's doing, wording it never learnt is not.
Writes experiments/results/token_gap.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from l3m_lightning.constants import IGNORE_INDEX  # noqa: E402
from l3m_lightning.data import ChatDataModule  # noqa: E402
from l3m_lightning.module import L3MModule  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "token_gap.json"
BINS = ((0.0, 0.05), (0.05, 0.5), (0.5, 1.5), (1.5, float("inf")))


@torch.no_grad()
def score(checkpoint: str, batches: list[dict]) -> list[dict]:
    """Per reference token: NLL, p(EOS), position (0 = first response token), the token and its context."""
    module = L3MModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    eos, rows = module.tokenizer.eos_token_id, []
    for batch in batches:
        logp = torch.log_softmax(module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float(), -1)
        targets = batch["labels"][:, 1:]
        for i in range(len(targets)):
            positions = (targets[i] != IGNORE_INDEX).nonzero().flatten().tolist()
            for k, j in enumerate(positions):
                token = int(targets[i, j])
                rows.append({"nll": -logp[i, j, token].item(), "p_eos": logp[i, j, eos].exp().item(), "first": k == 0,
                             "last": k == len(positions) - 1, "token": module.tokenizer.decode([token]),
                             "context": module.tokenizer.decode(batch["input_ids"][i, positions[0] + 1: j + 1])[-40:]})  # the tokens before it
    return rows


def summarise(reference: list[dict], constrained: list[dict]) -> dict:
    total = sum(c["nll"] - r["nll"] for r, c in zip(reference, constrained))
    parts = {"first token": lambda r: r["first"], "EOS": lambda r: r["last"] and not r["first"]}
    parts.update({f"inner, reference nll in [{lo:g}, {hi:g})": (lambda r, lo=lo, hi=hi: not r["first"] and not r["last"] and lo <= r["nll"] < hi) for lo, hi in BINS})
    table = []
    for name, pick in parts.items():
        pairs = [(r, c) for r, c in zip(reference, constrained) if pick(r)]
        gap = sum(c["nll"] - r["nll"] for r, c in pairs)
        table.append({"tokens": name, "count": len(pairs), "reference_nll": sum(r["nll"] for r, _ in pairs) / max(len(pairs), 1),
                      "constrained_nll": sum(c["nll"] for _, c in pairs) / max(len(pairs), 1), "gap_nats": gap, "share": gap / total if total else 0.0})
    inner = [c for r, c in zip(reference, constrained) if not r["first"] and not r["last"]]
    return {"tokens": len(reference), "gap_nats": total, "gap_per_token": total / len(reference), "parts": table,
            "constrained_mean_p_eos_inside": sum(c["p_eos"] for c in inner) / max(len(inner), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", help="checkpoint of the unconstrained (sft) run")
    parser.add_argument("constrained", help="checkpoint of the constrained run")
    parser.add_argument("--rows", type=int, default=100, help="held-out references scored (length_table.py uses 100)")
    parser.add_argument("--top", type=int, default=10, help="print the tokens with the largest gaps")
    args = parser.parse_args()
    data = ChatDataModule(dataset="embedded", tokenizer="embedded", batch_size=16, max_val_rows=args.rows)
    data.setup("test")
    batches = list(data.test_dataloader())
    reference, constrained = score(args.reference, batches), score(args.constrained, batches)
    result = summarise(reference, constrained)
    print(f"{result['tokens']} reference tokens; extra NLL {result['gap_nats']:.0f} nats ({result['gap_per_token']:+.3f} per token, "
          f"perplexity ×{torch.tensor(result['gap_per_token']).exp():.3f}); p(EOS) inside answers: {result['constrained_mean_p_eos_inside']:.4f}")
    print(f"| tokens | count | reference nll | constrained nll | extra nats | share |\n|---|---:|---:|---:|---:|---:|")
    for p in result["parts"]:
        print(f"| {p['tokens']} | {p['count']} | {p['reference_nll']:.3f} | {p['constrained_nll']:.3f} | {p['gap_nats']:+.0f} | {p['share']:.2f} |")
    worst = sorted(zip(reference, constrained), key=lambda rc: rc[0]["nll"] - rc[1]["nll"])[: args.top]
    for r, c in worst:
        print(f"  {c['nll'] - r['nll']:+.2f}  …{r['context']!r} → {r['token']!r}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"reference": args.reference, "constrained": args.constrained, **result}, indent=2))


if __name__ == "__main__":
    main()
