import json

import pytest
import torch

from l3m_lightning.report import constraint_row, mean_confidence_interval, to_markdown, write_report


def test_interval_covers_the_true_mean_at_about_the_nominal_rate():
    # Skewed, length-like values: exponential with mean 20, n = 200 per interval, 4000 intervals.
    gen = torch.Generator().manual_seed(0)
    samples = torch.empty(4000, 200, dtype=torch.float64).exponential_(1 / 20.0, generator=gen)
    covered = sum(ci["low"] <= 20.0 <= ci["high"] for ci in map(mean_confidence_interval, samples))
    rate = covered / 4000
    assert 0.93 <= rate <= 0.965, rate  # binomial sd ≈ 0.0035 around 0.95


def test_interval_closed_form_and_edge_cases():
    ci = mean_confidence_interval(torch.tensor([1.0, 3.0]))
    assert ci["mean"] == 2.0 and ci["high"] - 2.0 == pytest.approx(1.959964 * (2**0.5) / 2**0.5, rel=1e-5)
    assert mean_confidence_interval(torch.tensor([])).get("n") == 0


def test_constraint_row_and_report_files(tmp_path):
    row = constraint_row("length", "at_most", 10, torch.tensor([8.0, 9.0, 12.0]), torch.tensor([-0.2, -0.1, 0.2]))
    assert row["requirement"] == "<= 10" and row["holds"] and not row["holds_with_95_confidence"]
    report = {"split": "test", "global_step": 7, "ppl": 3.5, "mean_length": mean_confidence_interval(torch.tensor([8.0, 9.0, 12.0])), "constraints": [row]}
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text())["constraints"][0]["constraint"] == "length"
    md = (tmp_path / "report.md").read_text()
    assert md == to_markdown(report) and "| length | <= 10 | 9.667" in md
