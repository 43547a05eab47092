"""prom: request counter deltas per (adapter, rank, status) from Prometheus text."""

from __future__ import annotations

from collections import Counter

from matryoshka_lora.loadtest.prom import counter_sum, gauge, parse, request_counts, request_delta

BEFORE = """
# TYPE matryoshka_requests_total counter
matryoshka_requests_total{adapter="a",rank="8",status="200"} 3.0
matryoshka_requests_total{adapter="a",rank="none",status="503"} 1.0
# TYPE matryoshka_num_requests_waiting gauge
matryoshka_num_requests_waiting 2.0
"""
AFTER = """
# TYPE matryoshka_requests_total counter
matryoshka_requests_total{adapter="a",rank="8",status="200"} 5.0
matryoshka_requests_total{adapter="a",rank="none",status="503"} 1.0
matryoshka_requests_total{adapter="base",rank="0",status="200"} 4.0
# TYPE matryoshka_budget_requests_total counter
matryoshka_budget_requests_total{adapter="a",outcome="hit"} 7.0
matryoshka_budget_requests_total{adapter="b",outcome="hit"} 1.0
matryoshka_budget_requests_total{adapter="a",outcome="miss"} 2.0
"""


def test_request_counts_and_delta():
    assert request_counts(parse(BEFORE)) == Counter({("a", "8", "200"): 3, ("a", "none", "503"): 1})
    assert request_delta(parse(BEFORE), parse(AFTER)) == Counter({("a", "8", "200"): 2, ("base", "0", "200"): 4})


def test_gauge_and_counter_sum():
    assert gauge(parse(BEFORE), "matryoshka_num_requests_waiting") == 2.0
    assert gauge(parse(AFTER), "matryoshka_num_requests_waiting") is None
    samples = parse(AFTER)
    assert counter_sum(samples, "matryoshka_budget_requests_total", outcome="hit") == 8.0
    assert counter_sum(samples, "matryoshka_budget_requests_total", adapter="a", outcome="miss") == 2.0
