"""The arrival meters: decaying rates of prefill seconds and output tokens, the output share requests really use."""

from __future__ import annotations

import numpy as np
import pytest

from matryoshka_lora.engine.budget.arrivals import Arrivals, RateMeter


def test_rate_meter_decays():
    meter = RateMeter(window_s=10.0)
    assert meter.rate(0.0) == 0.0
    for t in range(100):  # 128 tokens every second for 100 s: ~128 tokens/s
        meter.add(128, float(t))
    assert meter.rate(99.0) == pytest.approx(128 * (1 - np.exp(-10.0)) / (1 - np.exp(-0.1)) / 10, rel=1e-9)
    assert meter.rate(99.0) == pytest.approx(128, rel=0.06)
    assert meter.rate(199.0) < 1e-2  # quiet for 100 s: gone


def test_arrivals_count_what_requests_generate():
    """Requests that stop at EOS after a quarter of max_tokens: the output demand follows (EMA)."""
    arrivals = Arrivals(window_s=10.0, ema=0.5)
    for _ in range(20):
        arrivals.finished(16, 64)
    assert arrivals.output_fill == pytest.approx(0.25, rel=1e-3)
    arrivals.add(0.04, 64, now=0.0)
    assert arrivals.decode_tokens.rate(0.0) == pytest.approx(0.25 * 64 / 10.0, rel=1e-3)
    assert arrivals.prefill_seconds.rate(0.0) == pytest.approx(0.04 / 10.0)
