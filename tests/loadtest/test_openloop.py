"""openloop: the Poisson arrival clock (seeded, bounded in time and count); bursts (ours, and the OpenAI
one) against a real `serve` subprocess (tiny model)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.loadtest.openloop import Arrivals, HttpStatusError, burst, completions_burst
from matryoshka_lora.loadtest.plan import Plan


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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("num_requests", [2, 4])  # the server queues at most 4 at once
def test_burst_sends_the_mix_in_turn_all_at_once(lt_server, num_requests):
    """A burst (the peers scenario's like-for-like workload): request i gets mix entry i mod the mix,
    every request is sent before the first one ends, each streams its whole output."""
    mix = [{"adapter": "alpha", "rank": 1}, {"adapter": "beta", "rank": 4}, {"adapter": None, "rank": None}]
    plan = Plan(mix=mix, prompt="one two three", max_tokens=8, ignore_eos=True)
    records = asyncio.run(burst(lt_server.url, plan, num_requests))
    assert [r.status for r in records] == [200] * num_requests
    expected = [(e["adapter"], e["rank"] or 0) for e in mix * 2][:num_requests]  # the base model: rank 0
    assert [(r.adapter, r.rank) for r in records] == expected
    assert {r.num_output_tokens for r in records} == {8}
    first_end = min(r.start + r.e2e_s for r in records)
    assert max(r.start for r in records) < first_end


@pytest.mark.timeout(300)
def test_completions_burst_counts_each_answer_from_its_usage_chunk(lt_server):
    """The OpenAI burst (the client the vLLM serve peer is measured with) against our own /v1/completions."""
    counts = asyncio.run(completions_burst(lt_server.url, "alpha@4", "one two three", 8, 3))
    assert [c.completion_tokens for c in counts] == [8, 8, 8]
    assert len({c.prompt_tokens for c in counts}) == 1 and counts[0].prompt_tokens > 0


@pytest.mark.timeout(120)
def test_completions_burst_raises_on_a_refusal(lt_server):
    with pytest.raises(HttpStatusError, match="404") as info:
        asyncio.run(completions_burst(lt_server.url, "no-such-adapter", "one two three", 4, 2))
    assert info.value.status == 404 and "no-such-adapter" in info.value.body
