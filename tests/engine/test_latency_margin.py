"""LatencyMargin: the quantile of observed / predicted latency over the recent promised requests."""

from __future__ import annotations

import pytest

from matryoshka_lora.engine.latency_margin import LatencyMargin
from matryoshka_lora.errors import ConfigError


@pytest.mark.parametrize("ratios, expected", [
    ([], 1.0),
    ([3.0] * 15, 1.0),  # fewer than min_samples (16): no margin yet
    ([3.0] * 16, 3.0),
    ([0.5] * 40, 1.0),  # faster than predicted: never below 1 (a margin never raises a rank)
    ([1.0 + i / 99 for i in range(100)], pytest.approx(1.95)),  # the 0.95 quantile of 1.00 .. 2.00
])
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
    assert margin.value(now=100.0) == pytest.approx(1.0 + 4.0 * 0.5 ** 3.0)
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


@pytest.mark.parametrize("kwargs", [{"quantile": 0.0}, {"quantile": 1.5}, {"min_samples": 0},
                                    {"min_samples": 300, "max_samples": 256}, {"max_age_s": 0.0},
                                    {"half_life_s": 0.0}])
def test_refused_settings(kwargs):
    with pytest.raises(ConfigError):
        LatencyMargin(**kwargs)
