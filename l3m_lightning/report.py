"""Held-out verification: per-constraint means with 95% confidence intervals, as JSON and Markdown.

The constraints are on averages (method.md §1), so "does it hold on held-out prompts" is a
statement about a mean estimated from samples: we report the mean, a normal-approximation
confidence interval (fine for the hundreds of prompts an eval set has) and whether the mean,
and the whole interval, are on the feasible side.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch


def mean_confidence_interval(values: torch.Tensor, level: float = 0.95) -> dict[str, float]:
    """Mean and the two-sided ``level`` interval ``mean ± z·s/√n`` (s: sample std)."""
    values = values.detach().double().flatten()
    n = values.numel()
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = values.mean().item()
    half = NormalDist().inv_cdf(0.5 + level / 2) * values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else math.inf
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def constraint_row(name: str, sense: str, threshold: float, rewards: torch.Tensor, costs: torch.Tensor) -> dict[str, Any]:
    """One constraint's held-out verdict: reward stats in its own units, cost stats (≤ 0 holds)."""
    cost = mean_confidence_interval(costs)
    return {
        "constraint": name,
        "requirement": f"{'<=' if sense == 'at_most' else '>='} {threshold:g}",
        "reward": mean_confidence_interval(rewards),
        "value": cost,
        "holds": bool(cost["mean"] <= 0),
        "holds_with_95_confidence": bool(cost["high"] <= 0),
    }


def write_report(directory: str | Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.md`` in ``directory``, each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / "report.json", json.dumps(report, indent=2))
    _atomic_write(directory / "report.md", to_markdown(report))


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Held-out report ({report['split']}, step {report['global_step']})", ""]
    lines.append(f"- perplexity: {report['ppl']:.4f}")
    if "mean_length" in report:
        m = report["mean_length"]
        lines.append(f"- mean response length: {m['mean']:.2f} tokens (95% CI {m['low']:.2f} – {m['high']:.2f}, n={m['n']})")
    if "finished_fraction" in report:
        lines.append(f"- responses that ended with a stop token (not cut at max_new_tokens): {100 * report['finished_fraction']:.1f}%")
    if report.get("constraints"):
        lines += ["", "| constraint | requirement | mean reward | 95% CI | holds | holds (95%) |", "| --- | --- | --- | --- | --- | --- |"]
        for row in report["constraints"]:
            r = row["reward"]
            lines.append(
                f"| {row['constraint']} | {row['requirement']} | {r['mean']:.4g} | {r['low']:.4g} – {r['high']:.4g} "
                f"| {'yes' if row['holds'] else 'no'} | {'yes' if row['holds_with_95_confidence'] else 'no'} |"
            )
    for i, sample in enumerate(report.get("samples") or []):
        if i == 0:
            lines += ["", "## Samples", ""]
        ending = "" if sample["finished"] else ", cut at max_new_tokens"
        lines += [f"**prompt:** {sample['prompt']}", "", f"**response ({sample['num_tokens']} tokens{ending}):** {sample['response']}", "", "---", ""]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
