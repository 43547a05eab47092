"""openloop: the Poisson arrival clock (seeded, bounded in time and count)."""

from __future__ import annotations

import numpy as np
import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.loadtest.openloop import Arrivals


@pytest.mark.parametrize("rate, duration", [(2.0, 500.0), (50.0, 40.0)])
def test_poisson_clock(rate, duration):
    times = Arrivals(rate, duration, seed=3).times()
    assert times == sorted(times) and 0 < times[0] and times[-1] < duration
    gaps = np.diff([0.0] + times)
    assert len(times) == pytest.approx(rate * duration, rel=0.1)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.1)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.15)  # exponential gaps: std == mean


def test_seeded_and_bounded_in_count():
    assert Arrivals(5.0, 10.0, seed=1).times() == Arrivals(5.0, 10.0, seed=1).times()
    assert Arrivals(5.0, 10.0, seed=1).times() != Arrivals(5.0, 10.0, seed=2).times()
    assert len(Arrivals(1000.0, 10.0, max_requests=7).times()) == 7


@pytest.mark.parametrize("rate, duration", [(0.0, 1.0), (1.0, 0.0)])
def test_refused(rate, duration):
    with pytest.raises(ConfigError):
        Arrivals(rate, duration)
