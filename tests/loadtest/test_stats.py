"""stats: exact percentiles and rates over request records."""

from __future__ import annotations

import numpy as np
import pytest

from matryoshka_lora.loadtest.records import RequestRecord
from matryoshka_lora.loadtest.stats import by_label, percentiles, row_of, summarize, window_s


@pytest.mark.parametrize("values", [[1.0], [3.0, 1.0, 2.0], list(np.linspace(0, 1, 101)), [0.5] * 7])
def test_percentiles_equal_numpy(values):
    got = percentiles(values)
    for p in (50, 90, 95, 99):
        assert got[f"p{p}"] == pytest.approx(np.percentile(values, p))
    assert got["mean"] == pytest.approx(np.mean(values))


def test_percentiles_of_nothing_are_none():
    assert percentiles([None, None]) == {"p50": None, "p90": None, "p95": None, "p99": None, "mean": None}


def records():
    """Two ok requests at rank 1 (10 tokens each), one at rank 8 (20 tokens), one refused; window 0..4 s."""
    return [
        RequestRecord(adapter="a", rank=1, status=200, start=100.0, ttft_s=0.5, e2e_s=1.0, num_output_tokens=10),
        RequestRecord(adapter="a", rank=1, status=200, start=101.0, ttft_s=0.5, e2e_s=2.0, num_output_tokens=10),
        RequestRecord(adapter="a", rank=8, status=200, start=102.0, ttft_s=1.0, e2e_s=2.0, num_output_tokens=20),
        RequestRecord(adapter="a", status=503, start=102.5, e2e_s=0.01),
    ]


def test_summarize_rates_over_the_window():
    s = summarize(records())
    assert window_s(records()) == pytest.approx(4.0)
    assert (s["num_requests"], s["num_ok"], s["statuses"]) == (4, 3, {"200": 3, "503": 1})
    assert s["output_tok_s"] == pytest.approx(40 / 4.0)
    assert s["req_s"] == pytest.approx(3 / 4.0)
    assert s["mean_rank"] == pytest.approx((1 + 1 + 8) / 3)
    assert s["e2e_s"]["p50"] == pytest.approx(2.0)
    assert s["tpot_s"]["mean"] == pytest.approx(np.mean([0.5 / 9, 1.5 / 9, 1.0 / 19]))


def test_by_label_groups_by_served_rank_with_the_shared_window():
    groups = by_label(records())
    assert sorted(groups) == ["a@1", "a@8", "a@none"]
    assert groups["a@1"]["output_tok_s"] == pytest.approx(20 / 4.0)
    assert groups["a@8"]["output_tok_s"] == pytest.approx(20 / 4.0)


def test_row_of_is_flat_and_in_ms():
    row = row_of(summarize(records()), rank=1, users=4)
    assert (row["rank"], row["users"], row["num_ok"]) == (1, 4, 3)
    assert row["e2e_p50_ms"] == pytest.approx(2000.0)
    assert row["ttft_p99_ms"] == pytest.approx(np.percentile([500, 500, 1000], 99), abs=0.01)
