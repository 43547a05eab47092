"""rank_policy: a running promise as admission sees it: its budget left, tokens left and pace."""

from __future__ import annotations

import pytest

from matryoshka_lora.engine.budget.promises import Promise
from matryoshka_lora.engine.budget.rank_policy import promise
from matryoshka_lora.engine.sequence import Sequence
from matryoshka_lora.types import GenerationRequest, SamplingParams

from ..engine_support import bare_sequence


def running_seq(num_output: int, first_token_t: float | None, max_tokens: int = 64) -> Sequence:
    req = GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=max_tokens), latency_budget_ms=1000.0)
    seq = bare_sequence(req, "budget")
    seq.token_ids += [7] * num_output
    seq.first_token_t = first_token_t
    return seq


@pytest.mark.parametrize(
    "num_output, first_token_t, expected",
    [
        (0, None, Promise(0.5, 64)),  # no token yet
        (1, 9.0, Promise(0.5, 63)),
        (15, 9.0, Promise(0.5, 49)),  # under a quarter of its 64: its pace is still mostly its neighbours' prefill
        (16, 8.5, Promise(0.5, 48, 0.1, 15)),  # 15 token gaps in 1.5 s
        (64, 3.7, Promise(0.5, 0, 0.1, 63)),
    ],
)
def test_pace_counts_once_a_quarter_is_out(num_output, first_token_t, expected):
    seq = running_seq(num_output, first_token_t)
    seq.enqueue_t = 9.5  # its budget of 1 s began 0.5 s ago
    got = promise(seq, seq.max_len - len(seq.token_ids), now=10.0)
    assert (got.num_remaining, got.num_paced) == (expected.num_remaining, expected.num_paced)
    assert (got.budget_left_s, got.seconds_per_token) == pytest.approx(
        (expected.budget_left_s, expected.seconds_per_token)
    )
