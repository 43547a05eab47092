"""overload: Poisson arrivals well above capacity for a minute, then normal load again.

    server     started with --max-queue-len 32 (--max-queue-len), --max-num-seqs 32
    before     unloaded e2e at r_max (4 requests, one at a time)             -> L_0
    probe      capacity C at r_max: max_num_seqs closed-loop users, 2 x max_num_seqs requests
    overload   3 x C requests/s for --duration s (60), engine gauges sampled every 0.5 s
    after      4 requests one at a time, right after the overload ended     -> L_after

Invariants: no 5xx but 503; every 429/503 carries Retry-After; the waiting queue never exceeds its
bound; every accepted request completes; counters match. Goals: back-pressure engaged (some 503/429);
L_after <= 1.5 x L_0 (normal latency right after).
"""

from __future__ import annotations

import asyncio

from matryoshka_lora.loadtest import prom
from matryoshka_lora.loadtest.checks import bounded_queue, goal, refusals_have_retry_after
from matryoshka_lora.loadtest.config import LoadTestConfig, MixEntry
from matryoshka_lora.loadtest.openloop import Arrivals, open_loop
from matryoshka_lora.loadtest.phases import RunContext, ScenarioResult, measure
from matryoshka_lora.loadtest.probe import capacity, unloaded

OVERLOAD_FACTOR = 3.0
RECOVERY_FACTOR = 1.5


def prepare(config: LoadTestConfig, out) -> dict:
    """The server this scenario starts has a small, known queue bound."""
    return {"serve": {"max_queue_len": config.max_queue_len}}


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult("overload")
    cfg, adapter = ctx.config, ctx.primary
    entry = MixEntry(adapter.name, adapter.r_max)
    l_0, phase = unloaded(ctx, entry, tag="before")
    result.phases.append(phase)
    cap, phase = capacity(ctx, entry, cfg.max_num_seqs, 2 * cfg.max_num_seqs, tag="probe capacity")
    result.phases.append(phase)
    rate = OVERLOAD_FACTOR * cap
    plan = ctx.plan([entry], tag="overload")
    arrivals = Arrivals(rate, cfg.phase_s, cfg.max_requests, seed=cfg.seed)
    with prom.Sampler(ctx.url, interval_s=0.5) as sampler:
        overload = measure(
            ctx,
            f"overload at {rate:.2f} req/s",
            lambda: asyncio.run(open_loop(ctx.url, plan, arrivals)),
            allowed_5xx=(503,),
        )
    refusals = sum(1 for r in overload.records if r.status in (429, 503))
    overload.checks += [
        refusals_have_retry_after(overload.records),
        bounded_queue(sampler.max_waiting(), cfg.max_queue_len),
    ]
    overload.extra.update(offered_rps=rate, max_waiting=sampler.max_waiting(), num_refused=refusals)
    result.phases.append(overload)
    l_after, phase = unloaded(ctx, entry, tag="after")
    result.phases.append(phase)
    result.checks += [
        goal(
            "back-pressure engaged (some 429/503)",
            refusals > 0,
            f"{refusals} of {len(overload.records)} refused at {rate:.2f} req/s (capacity {cap:.2f})",
        ),
        goal(
            f"normal latency right after (<= {RECOVERY_FACTOR} x before)",
            l_after <= RECOVERY_FACTOR * l_0,
            f"median e2e before {l_0 * 1000:.0f} ms, after {l_after * 1000:.0f} ms",
        ),
    ]
    result.tables["overload"] = [
        {
            "capacity_rps": round(cap, 3),
            "offered_rps": round(rate, 3),
            "num_requests": len(overload.records),
            "statuses": overload.summary["statuses"],
            "max_waiting": sampler.max_waiting(),
            "max_queue_len": cfg.max_queue_len,
            "e2e_before_ms": round(l_0 * 1000, 1),
            "e2e_after_ms": round(l_after * 1000, 1),
        }
    ]
    return result
