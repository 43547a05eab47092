"""The rules scenarios judge by: budget hit rate, RSS flatness, peer goals (met, missed, not measured)."""

from __future__ import annotations

import pytest

from matryoshka_lora.loadtest.records import RequestRecord
from matryoshka_lora.loadtest.scenarios.budget import RATE_FACTORS, hit_rate, steps_below
from matryoshka_lora.loadtest.scenarios.peers import GOALS, peer_goal
from matryoshka_lora.loadtest.scenarios.soak import rss_trend


@pytest.mark.parametrize(
    "e2e_and_status, expected",
    [
        ([(0.5, 200), (0.9, 200)], 1.0),
        ([(0.5, 200), (1.5, 200)], 0.5),
        ([(0.5, 200), (0.01, 503)], 0.5),  # a refusal misses its budget
        ([], None),
    ],
)
def test_budget_hit_rate(e2e_and_status, expected):
    records = [RequestRecord(adapter="a", status=s, e2e_s=e) for e, s in e2e_and_status]
    assert hit_rate(records, budget_ms=1000.0) == expected


@pytest.mark.parametrize("capacity", [1.2459534, 0.83, 1.7312])
def test_the_step_at_capacity_is_not_below_it(capacity):
    rates = tuple(f * capacity for f in RATE_FACTORS)
    rows = [{"offered_rps": round(r, 3)} for r in rates]
    assert [r["offered_rps"] for r in steps_below(rates, rows, capacity)] == [
        round(f * capacity, 3) for f in (0.25, 0.5, 0.75)
    ]


MIB = 2**20


@pytest.mark.parametrize(
    "rss, growth_mib",
    [
        ([500 * MIB] * 20, 0.0),
        ([500 * MIB + i * MIB for i in range(20)], 9.0),  # 1 MiB per sample over the second half's 9 steps
        ([400 * MIB] * 5 + [500 * MIB] * 15, 0.0),  # warm-up growth in the first half is not a leak
    ],
)
def test_rss_trend_over_the_second_half(rss, growth_mib):
    trend = rss_trend([float(t) for t in range(len(rss))], [float(v) for v in rss])
    assert trend["growth_bytes"] / MIB == pytest.approx(growth_mib, abs=1e-6)


ROWS = [
    {"system": "vLLM serve (base), 16 at once, HTTP streaming", "output_tok_s": 90.0},
    {"system": "vLLM (base)", "output_tok_s": 100.0},
    {"system": "vLLM (LoRA r64)", "output_tok_s": 20.0},
    {"system": "transformers generate (PEFT r64, unmerged)", "output_tok_s": 80.0},
    {"system": "transformers generate_batch (base)", "output_tok_s": 30.0},
    {"system": "transformers generate_batch (PEFT r64)", "output_tok_s": None, "error": "boom"},
    {"system": "llama.cpp (mixed LoRA scales 1/0/0.5), 16 at once", "output_tok_s": 40.0},
]


@pytest.mark.parametrize(
    "ours, expected",
    [
        (150.0, [True, True, True, True, True, True]),  # 1.67x, 1.5x, 7.5x, 1.875x, 5x (generate_batch: base), 3.75x
        (100.0, [True, False, True, False, True, False]),  # > serve; equal to offline is not "more"; 1.25x < 1.5x
        (90.0, [False, False, True, False, True, False]),
        (None, [None, None, None, None, None, None]),
    ],
)
def test_peer_goals(ours, expected):
    assert [peer_goal(ours, ROWS, *g).passed for g in GOALS] == expected


@pytest.mark.parametrize("goal", [0, 1])
def test_peer_goal_not_measured(goal):
    assert peer_goal(150.0, ROWS[3:], *GOALS[goal]).passed is None
