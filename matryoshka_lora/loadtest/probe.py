"""Short measurements that size a scenario's load to the machine it runs on.

unloaded latency at rank r  = median e2e of `num` requests sent one after another
capacity at rank r          = requests/s of a closed loop of `users` clients sending `num` requests
"""

from __future__ import annotations

import asyncio
import statistics

from matryoshka_lora.loadtest.config import MixEntry
from matryoshka_lora.loadtest.openloop import closed_loop
from matryoshka_lora.loadtest.phases import Phase, RunContext, measure
from matryoshka_lora.loadtest.stats import window_s


def unloaded(ctx: RunContext, entry: MixEntry, num: int = 4, tag: str = "unloaded") -> tuple[float, Phase]:
    """(median e2e in seconds, the phase) of `num` sequential requests."""
    plan = ctx.plan([entry], tag=tag)
    phase = measure(ctx, f"{tag} {entry.adapter}@{entry.rank}", lambda: asyncio.run(closed_loop(ctx.url, plan, 1, num)))
    e2e = [r.e2e_s for r in phase.records if r.ok and r.e2e_s is not None]
    return (statistics.median(e2e) if e2e else float("nan")), phase


def capacity(ctx: RunContext, entry: MixEntry, users: int, num: int, tag: str = "capacity") -> tuple[float, Phase]:
    """(completed requests/s of a closed loop, the phase). A burst of `users` may overflow a small queue:
    503s are allowed here, and only completed requests count."""
    plan = ctx.plan([entry], tag=tag)
    phase = measure(
        ctx,
        f"{tag} {entry.adapter}@{entry.rank} x {users}",
        lambda: asyncio.run(closed_loop(ctx.url, plan, users, num)),
        allowed_5xx=(503,),
    )
    ok = [r for r in phase.records if r.ok]
    wall = window_s(phase.records)
    return (len(ok) / wall if wall > 0 else float("nan")), phase


def warm_up(ctx: RunContext, rounds: int = 2) -> Phase:
    """Every (adapter, sweep rank) once per round, one request at a time, before anything is measured
    (first requests at a shape pay one-off costs). A checked phase of its own, kept out of the tables."""
    entries = [MixEntry(a.name, r) for a in ctx.adapters for r in ctx.sweep_ranks(a)]

    async def run_all():
        records = []
        for _ in range(rounds):
            for entry in entries:
                records += await closed_loop(ctx.url, ctx.plan([entry], tag="warm-up"), 1, 1)
        return records

    return measure(ctx, "warm-up", lambda: asyncio.run(run_all()))
