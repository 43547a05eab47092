"""rank-sweep: the same workload at ranks 1, 8, 32 and r_max, each at 1, 4 and 16 closed-loop users.

    for users in --users:            (default 1, 4, 16)
        for rank in sweep ranks:     (default 1, 8, 32, r_max of the first adapter)
            Locust, `users` users, --duration s: every request `adapter@rank`
            -> TTFT, TPOT, ITL, e2e p50/p90/p99, output tokens/s, requests/s

Each cell is one phase with its own /metrics check. Plots: latency percentiles per rank, and
throughput against concurrency.
"""

from __future__ import annotations

from matryoshka_lora.loadtest import plots
from matryoshka_lora.loadtest.checks import Check
from matryoshka_lora.loadtest.config import MixEntry
from matryoshka_lora.loadtest.locust_run import LocustRun, run_locust
from matryoshka_lora.loadtest.phases import Phase, RunContext, ScenarioResult, measure, slug
from matryoshka_lora.loadtest.stats import row_of


def locust_phase(ctx: RunContext, name: str, mix: list[MixEntry], users: int, duration_s: float) -> Phase:
    """One Locust run as a measured phase, with Locust's own count checked against the records."""
    prefix = ctx.out / "locust" / slug(name)
    holder: list[LocustRun] = []

    def run():
        holder.append(run_locust(ctx.url, ctx.plan(mix, tag=name), users, duration_s, prefix))
        return holder[0].records

    phase = measure(ctx, name, run)
    locust_count = holder[0].count("E2E")
    phase.checks.append(
        Check(
            "Locust's stats agree",
            locust_count == len(phase.records),
            f"Locust E2E count {locust_count}, records {len(phase.records)}",
        )
    )
    phase.extra.update(users=users, locust_csv=f"{prefix}_stats.csv", locust_html=f"{prefix}.html")
    return phase


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult("rank-sweep")
    adapter = ctx.primary
    rows = []
    for users in ctx.config.users:
        for rank in ctx.sweep_ranks():
            phase = locust_phase(
                ctx, f"{adapter.name}@{rank} x {users} users", [MixEntry(adapter.name, rank)], users, ctx.config.phase_s
            )
            phase.extra["rank"] = rank
            result.phases.append(phase)
            rows.append(row_of(phase.summary, adapter=adapter.name, rank=rank, users=users))
    result.tables["latency per rank and concurrency"] = rows
    result.plots += [
        plots.rank_latency(rows, ctx.out / "latency_per_rank.png"),
        plots.throughput_vs_concurrency(rows, ctx.out / "throughput_vs_concurrency.png"),
    ]
    return result
