"""Sampling: greedy, the exponential-race sampler matches the softmax distribution, exact top-p nuclei."""

from __future__ import annotations

import pytest
import torch

from matryoshka_lora.engine.sampler import sample, sample_one, top_p_filter
from matryoshka_lora.types import SamplingParams

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize("top_p, kept", [(1.0, 4), (0.95, 3), (0.8, 2), (0.7, 2), (0.5, 1), (0.1, 1)])
def test_top_p_keeps_the_smallest_nucleus(top_p, kept):
    out = top_p_filter(PROBS.clone(), top_p)
    assert int((out > 0).sum()) == kept and torch.equal(out[:kept], PROBS[:kept])


def test_top_p_beyond_the_candidate_shortcut():
    """A flat distribution whose nucleus is larger than the top-k shortcut still gets the exact nucleus."""
    probs = torch.full((4096,), 2.0**-12)  # exact sums in float32
    assert int((top_p_filter(probs, 0.5) > 0).sum()) == 2048


@pytest.mark.parametrize("temperature, expected", [(1.0, PROBS), (0.5, PROBS**2 / (PROBS**2).sum())])
def test_sampling_follows_the_distribution(temperature, expected):
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=temperature)
    counts = torch.bincount(torch.tensor([sample_one(PROBS.log(), params, gen) for _ in range(8000)]), minlength=4)
    torch.testing.assert_close(counts / 8000, expected, atol=0.02, rtol=0)


def test_greedy_rows_and_seeds():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams()
    hot = SamplingParams(temperature=1.0)
    first = sample(
        logits, [greedy, hot, hot], [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    )
    again = sample(
        logits, [greedy, hot, hot], [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    )
    assert first == again and first[0] == int(logits[0].argmax())
