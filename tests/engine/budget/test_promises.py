"""promises: the predicted wait is the admission rule replayed: it ends at the first token where no promise
holds the newcomer any more."""

from __future__ import annotations

import pytest

from matryoshka_lora.engine.budget.promises import Promise, hold_s, holds, seconds_until_released

STEP, DELTA, EXTRA = 0.014, 0.00101, 0.0101  # the model's step, the newcomer's row in it, its prefill


def advanced(p: Promise, k: int, ahead: float) -> Promise:
    """p after k more tokens at the model's step (the pending prefill behind it), its pace drifting."""
    elapsed = ahead + k * STEP
    pace = p.seconds_per_token
    if p.num_paced > 0:
        pace = (p.seconds_per_token * p.num_paced + elapsed) / (p.num_paced + k)
    return Promise(p.budget_left_s - elapsed, p.num_remaining - k, pace, p.num_paced + k if p.num_paced else 0)


@pytest.mark.parametrize(
    "p, ahead",
    [
        (Promise(1.45, 100), 0.0),  # kept once its last tokens pay little for the new row
        (Promise(1.405, 100), 0.0),  # kept only when it ends
        (Promise(1.65, 100), 0.2),  # a pending prefill ahead of it
        (Promise(1.55, 100, 0.0145), 0.0),  # behind the model, its pace fixed
        (Promise(1.55, 100, 0.020), 0.0),  # late at its pace, in time at the model's step
        (Promise(1.6, 75, 0.030, 25), 0.0),  # a slow start (a cluster's prefills) that the next tokens dilute
        (Promise(1.35, 80, 0.016, 20), 0.1),
    ],
)
def test_the_wait_ends_where_the_rule_stops_holding(p, ahead):
    assert holds(p, STEP, DELTA, ahead, EXTRA)
    wait = seconds_until_released(p, STEP, DELTA, ahead, EXTRA)
    k = round((wait - ahead) / STEP)
    assert wait == pytest.approx(ahead + k * STEP) and 1 <= k <= p.num_remaining
    assert all(holds(advanced(p, j, ahead), STEP, DELTA, 0.0, EXTRA) for j in range(1, k))
    assert k == p.num_remaining or not holds(advanced(p, k, ahead), STEP, DELTA, 0.0, EXTRA)


def test_a_slow_start_is_diluted():
    """The same pace measured over its first 25 tokens releases sooner than a pace that never changes."""
    fixed, diluted = Promise(1.6, 75, 0.030), Promise(1.6, 75, 0.030, 25)
    assert seconds_until_released(diluted, STEP, DELTA, 0.0, EXTRA) < seconds_until_released(
        fixed, STEP, DELTA, 0.0, EXTRA
    )


def test_the_wait_is_the_longest_among_the_promises_that_hold():
    promises = (Promise(1.45, 100), Promise(0.75, 50), Promise(9.0, 10), Promise(1.2, 100))
    waits = [seconds_until_released(p, STEP, DELTA, 0.0, EXTRA) for p in promises[:2]]
    assert not holds(promises[2], STEP, DELTA, 0.0, EXTRA)  # ample
    assert not holds(promises[3], STEP, DELTA, 0.0, EXTRA)  # past its budget even alone: given up
    assert hold_s(promises, STEP, DELTA, 0.0, EXTRA) == max(waits) > 0
    assert hold_s(promises[2:], STEP, DELTA, 0.0, EXTRA) == 0.0
