"""Promises are kept at admission: whether a waiting request may join the batch now, and how long it waits.

A request served at a rank predicted to meet its budget (a promise) was predicted with the load of its
moment; each request that joins the batch after it adds a decode row to its remaining steps and its
prompt's prefill steps before them. So a waiting request joins only when no promise that still fits
would end past its budget because of it (the scheduler asks before each admission, `CostModel.hold_s`
prices the terms). For each promise p, with
    ahead   = the extra seconds of the prefill steps already pending, over plain decode steps
    step    = the active set's decode step (the model's);  delta = the step with the new row - step
    extra   = the extra seconds of the new prompt's prefill steps, over plain decode steps
    pace    = p's own seconds per token since its first, once a quarter of its tokens are out (the
              prefill steps of the requests that joined after it are in it; latency_margin.pace_s)
    alone   = ahead + p's remaining tokens x step                           p's end if nobody joins
    without = ahead + p's remaining tokens x max(step, pace)
    with    = without + extra + p's remaining tokens x delta
the new request waits while some p has  alone <= p's budget left < with.
A promise past its budget even alone holds nobody: holding would not save it (its pace decides no
abandonment: a cluster of arrivals at its start slows its first tokens far more than the rest).

How long it waits (`hold_s`, the `hold` term of its prediction): the rule is replayed token by token
for each promise that holds it, as that promise runs on at the model's step with nobody joining (the
hold keeps them out): its budget left shrinks by a step per token, its remaining tokens by one, and
its pace drifts toward the step (the stalls of its first tokens are diluted). The newcomer joins at
the first token where no promise holds it any more: kept (its last tokens pay little for the new
row), given up (alone past its budget left), or ended.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Promise:
    """An active request served at a rank predicted to meet its budget (rank_reason "budget")."""

    budget_left_s: float  # its budget minus the time since it was enqueued
    num_remaining: int  # output tokens it still has to produce
    seconds_per_token: float = 0.0  # its pace since its first token (prefill stalls in it), 0 early on
    num_paced: int = 0  # the tokens that pace was measured over (0: it stays as it is)


def holds(p: Promise, step: float, delta: float, ahead: float, extra: float) -> bool:
    """Whether p holds a newcomer now: alone <= p's budget left < with (module docstring)."""
    if ahead + p.num_remaining * step > p.budget_left_s:
        return False  # past its budget even if nobody else joins: holding would not save it
    without = ahead + p.num_remaining * max(step, p.seconds_per_token)
    return without + extra + p.num_remaining * delta > p.budget_left_s


def seconds_until_released(p: Promise, step: float, delta: float, ahead: float, extra: float) -> float:
    """Seconds until p (holding the newcomer now) lets it join, p running on at `step` per token."""
    if p.num_remaining <= 0:
        return ahead
    k = np.arange(1, p.num_remaining + 1)  # tokens from now
    elapsed = ahead + k * step
    remaining, left = p.num_remaining - k, p.budget_left_s - elapsed
    pace = np.full(k.shape, p.seconds_per_token)
    if p.num_paced > 0:
        pace = (p.seconds_per_token * p.num_paced + elapsed) / (p.num_paced + k)
    released = (remaining * step > left) | (remaining * np.maximum(step, pace) + extra + remaining * delta <= left)
    released[-1] = True  # it has ended
    return float(elapsed[np.argmax(released)])


def hold_s(promises: tuple[Promise, ...], step: float, delta: float, ahead: float, extra: float) -> float:
    """Seconds a newcomer waits before it may join, 0 for at once: until every promise lets it join."""
    return max(
        (seconds_until_released(p, step, delta, ahead, extra) for p in promises if holds(p, step, delta, ahead, extra)),
        default=0.0,
    )
