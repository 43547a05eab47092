"""LatencyMargin: the quantile of observed / predicted latency over the recent promised requests, and
the running promised requests projected to their end at their own pace."""

from __future__ import annotations

import pytest

from matryoshka_lora.engine.budget.latency_margin import LatencyMargin, in_flight_ratios, projected_ratio
from matryoshka_lora.engine.sequence import Sequence
from matryoshka_lora.errors import ConfigError
from matryoshka_lora.types import GenerationRequest, SamplingParams


@pytest.mark.parametrize(
    "ratios, expected",
    [
        ([], 1.0),
        ([3.0] * 15, 1.0),  # fewer than min_samples (16): no margin yet
        ([3.0] * 16, 3.0),
        ([0.5] * 40, 1.0),  # faster than predicted: never below 1 (a margin never raises a rank)
        ([1.0 + i / 99 for i in range(100)], pytest.approx(1.95)),  # the 0.95 quantile of 1.00 .. 2.00
    ],
)
def test_the_quantile_of_recent_ratios(ratios, expected):
    margin = LatencyMargin(quantile=0.95, min_samples=16, max_samples=256)
    for i, ratio in enumerate(ratios):
        margin.observe(2.0, 2.0 * ratio, now=float(i) * 0.01)
    assert margin.value(now=1.0) == expected


def test_old_ratios_expire_and_the_margin_then_decays_to_1():
    margin = LatencyMargin(max_age_s=60.0, min_samples=4, half_life_s=30.0)
    for t in range(4):
        margin.observe(1.0, 5.0, now=float(t))
    assert margin.value(now=10.0) == 5.0
    # two of four left at 62.5: too few to compute it, the last one (5 at t = 10) halves toward 1 every 30 s
    assert margin.value(now=62.5) == pytest.approx(1.0 + 4.0 * 0.5 ** (52.5 / 30.0))
    assert margin.value(now=100.0) == pytest.approx(1.0 + 4.0 * 0.5**3.0)
    assert margin.value(now=10_000.0) == pytest.approx(1.0)


def test_enough_fresh_ratios_replace_a_decaying_margin():
    margin = LatencyMargin(max_age_s=60.0, min_samples=2, half_life_s=30.0)
    margin.observe(1.0, 4.0, now=0.0)
    margin.observe(1.0, 4.0, now=0.0)
    assert margin.value(now=0.0) == 4.0
    margin.observe(1.0, 1.5, now=70.0)
    assert margin.value(now=70.0) > 1.5  # one fresh ratio is not enough: still the decaying 4
    margin.observe(1.0, 1.5, now=71.0)
    assert margin.value(now=71.0) == 1.5


def test_only_the_last_max_samples_count():
    margin = LatencyMargin(min_samples=2, max_samples=4)
    for ratio in (9.0, 9.0, 2.0, 2.0, 2.0, 2.0):
        margin.observe(1.0, ratio, now=0.0)
    assert margin.value(now=0.0) == 2.0


@pytest.mark.parametrize("predicted, observed", [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)])
def test_meaningless_observations_are_ignored(predicted, observed):
    margin = LatencyMargin(min_samples=1)
    margin.observe(predicted, observed, now=0.0)
    assert margin.value(now=0.0) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quantile": 0.0},
        {"quantile": 1.5},
        {"min_samples": 0},
        {"min_samples": 300, "max_samples": 256},
        {"max_age_s": 0.0},
        {"half_life_s": 0.0},
        {"fresh_s": 0.0},
    ],
)
def test_refused_settings(kwargs):
    with pytest.raises(ConfigError):
        LatencyMargin(**kwargs)


@pytest.mark.parametrize(
    "raw_s, elapsed_s, decode_s, num_output, num_remaining, expected",
    [
        (10.0, 4.0, 3.0, 16, 48, (4.0 + 48 * 3.0 / 15) / 10.0),  # a quarter done: 0.2 s per token so far
        (10.0, 4.0, 3.0, 15, 49, None),  # under a quarter: too early to project
        (10.0, 12.0, 9.0, 64, 0, 1.2),  # done: its latency over the prediction
        (10.0, 1.0, 0.0, 1, 0, None),  # a single token has no pace
        (0.0, 4.0, 3.0, 16, 48, None),
    ],
)
def test_projected_ratio(raw_s, elapsed_s, decode_s, num_output, num_remaining, expected):
    ratio = projected_ratio(raw_s, elapsed_s, decode_s, num_output, num_remaining)
    assert ratio == (None if expected is None else pytest.approx(expected))


def seq(reason, predicted_s, margin, enqueue_t, first_token_t, num_output, num_left, num_prompt=10) -> Sequence:
    """A running sequence with `num_output` tokens generated and `num_left` to go."""
    req = GenerationRequest("r", tuple(range(num_prompt)), SamplingParams(max_tokens=num_output + num_left))
    s = Sequence(
        req,
        emit=lambda e: None,
        adapter="a",
        adapter_slot=0,
        rank=8,
        scale=1.0,
        rank_reason=reason,
        detokenizer=None,
        stop_filter=None,
        generator=None,
        max_len=num_prompt + num_output + num_left,
        predicted_latency_s=predicted_s,
        budget_margin=margin,
        enqueue_t=enqueue_t,
        first_token_t=first_token_t,
    )
    s.token_ids += [0] * num_output
    return s


def test_the_running_promises_far_enough_along_count_and_the_others_do_not():
    now = 100.0
    running = [
        seq("budget", 20.0, 2.0, 90.0, 92.0, 33, 32),  # raw 10 s; 10 s + 32 x 8 / 32 s = 18 s: 1.8
        seq("budget", 10.0, 1.0, 95.0, 96.0, 33, 32),  # 5 s + 32 x 4 / 32 s = 9 s: 0.9
        seq("budget", 1.0, 1.0, 50.0, 99.0, 4, 60),  # far behind, but too early to project
        seq("requested", None, 1.0, 0.0, 1.0, 60, 4),  # not promised
        seq("budget", 5.0, 1.0, 99.5, None, 0, 64),  # still prefilling
    ]
    assert in_flight_ratios(running, now) == [pytest.approx(1.8), pytest.approx(0.9)]
    assert in_flight_ratios(running[2:], now) == []
    margin = LatencyMargin()
    margin.in_flight(in_flight_ratios(running[1:], now), now)
    assert margin.value(now) == 1.0 and margin.typical(now) == 1.0  # ahead of its prediction: no margin


def test_a_running_promise_behind_its_pace_raises_the_margin_while_fresh():
    margin = LatencyMargin(min_samples=4, fresh_s=5.0)
    margin.in_flight([1.8, 1.2, 1.4], now=10.0)
    assert margin.value(now=12.0) == 1.8  # the worst of them
    assert margin.typical(now=12.0) == 1.0  # the typical margin is learned from finished requests only
    assert margin.value(now=15.5) == 1.0  # not refreshed by a step for 5.5 s: ignored
    for t in range(4):
        margin.observe(1.0, 1.3, now=20.0 + t)
    margin.in_flight([1.1], now=24.0)
    assert margin.value(now=24.0) == pytest.approx(1.3)  # never below what finished requests taught
    margin.in_flight([1.6], now=25.0)
    assert margin.value(now=25.0) == 1.6 and margin.typical(now=25.0) == pytest.approx(1.3)


@pytest.mark.parametrize(
    "ratios, value, typical",
    [
        ([1.0 + i / 99 for i in range(100)], 1.95, 1.5),  # 1.00 .. 2.00: the 0.95 quantile and the median
        ([0.5] * 10 + [3.0] * 6, 3.0, 1.0),  # most requests early: the typical margin stays at 1
        ([2.0] * 16, 2.0, 2.0),
    ],
)
def test_the_typical_margin_is_the_median(ratios, value, typical):
    margin = LatencyMargin(min_samples=16, max_age_s=1000.0)
    for i, ratio in enumerate(ratios):
        margin.observe(1.0, ratio, now=float(i))
    now = float(len(ratios))
    assert margin.value(now) == pytest.approx(value) and margin.typical(now) == pytest.approx(typical)


def test_the_typical_margin_decays_like_the_margin():
    margin = LatencyMargin(min_samples=4, max_age_s=10.0, half_life_s=20.0)
    for t in range(4):
        margin.observe(1.0, 2.0 + t, now=float(t))  # ratios 2, 3, 4, 5
    assert margin.typical(now=4.0) == pytest.approx(3.5) and margin.value(now=4.0) == pytest.approx(4.85)
    # all expired at t = 14: each decays from its own last value, half way after 20 s
    assert margin.typical(now=24.0) == pytest.approx(1.0 + 2.5 * 0.5)
    assert margin.value(now=24.0) == pytest.approx(1.0 + 3.85 * 0.5)
