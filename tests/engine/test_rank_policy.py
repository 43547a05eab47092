"""rank_policy: a running promise's pace, as admission projects it."""

from __future__ import annotations

import pytest

from matryoshka_lora.backends.base import GenerationRequest, SamplingParams
from matryoshka_lora.engine.rank_policy import pace
from matryoshka_lora.engine.sequence import Sequence


def running_seq(num_output: int, first_token_t: float | None, max_tokens: int = 64) -> Sequence:
    req = GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=max_tokens), latency_budget_ms=1000.0)
    seq = Sequence(req, emit=lambda e: None, adapter=None, adapter_slot=-1, rank=0, scale=0.0, rank_reason="budget",
                   detokenizer=None, stop_filter=None, generator=None, max_len=3 + max_tokens)
    seq.token_ids += [7] * num_output
    seq.first_token_t = first_token_t
    return seq


@pytest.mark.parametrize("num_output, first_token_t, expected", [
    (0, None, 0.0),  # no token yet
    (1, 9.0, 0.0),
    (15, 9.0, 0.0),  # under a quarter of its 64: its pace is still mostly its neighbours' prefill steps
    (16, 8.5, 0.1),  # 15 token gaps in 1.5 s
    (64, 3.7, 0.1),
])
def test_pace_counts_once_a_quarter_is_out(num_output, first_token_t, expected):
    assert pace(running_seq(num_output, first_token_t), now=10.0) == pytest.approx(expected)
