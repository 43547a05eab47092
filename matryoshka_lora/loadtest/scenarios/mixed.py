"""mixed: users draw (adapter, rank) per request from a mix; each rank's latency inside the mix is
compared with the same rank alone at the same concurrency.

    mix   = uniform over {every loaded adapter} x {1, 8, 32, r_max}   (ranks each adapter has)
    phase "mix":        U users (the largest of --users, default 16), --duration s (default 60)
    phase "rank r":     U users, the same adapters, rank r only          (for each rank of the mix)
    table per rank:     TTFT / TPOT / e2e p50 and p99 in the mix and alone, ratio mix / alone
"""

from __future__ import annotations

import statistics

from matryoshka_lora.loadtest import plots
from matryoshka_lora.loadtest.config import MixEntry
from matryoshka_lora.loadtest.phases import Phase, RunContext, ScenarioResult
from matryoshka_lora.loadtest.scenarios.rank_sweep import locust_phase
from matryoshka_lora.loadtest.stats import ms, summarize


def mix_entries(ctx: RunContext, rank: int | None = None) -> list[MixEntry]:
    """Every adapter at every sweep rank it has (or at `rank` only)."""
    return [MixEntry(a.name, r) for a in ctx.adapters for r in ctx.sweep_ranks(a) if rank in (None, r)]


def run_mix(ctx: RunContext, users: int, duration_s: float) -> Phase:
    """The mixed-rank, mixed-adapter phase (also the peers scenario's measure of this server)."""
    mix = mix_entries(ctx)
    phase = locust_phase(ctx, f"mix x {users} users", mix, users, duration_s)
    phase.extra["mix"] = [f"{m.adapter}@{m.rank}" for m in mix]
    return phase


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def compare_row(rank: int, mixed: dict, alone: dict) -> dict:
    """p50 of TTFT / TPOT / e2e (and e2e p99) in the mix and alone, and their ratio."""
    row: dict = {"rank": rank, "num_in_mix": mixed["num_ok"], "num_alone": alone["num_ok"]}
    for metric, p in (("ttft", 50), ("tpot", 50), ("e2e", 50), ("e2e", 99)):
        m, a = mixed[f"{metric}_s"][f"p{p}"], alone[f"{metric}_s"][f"p{p}"]
        row[f"{metric}_p{p}_mix_ms"], row[f"{metric}_p{p}_alone_ms"] = ms(m), ms(a)
        row[f"{metric}_p{p}_mix/alone"] = ratio(m, a)
    return row


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult("mixed")
    users = max(ctx.config.users)
    mix_phase = run_mix(ctx, users, ctx.config.phase_s)
    result.phases.append(mix_phase)
    rows, alone_phases = [], []
    for rank in sorted({m.rank for m in mix_entries(ctx)}):
        alone = locust_phase(
            ctx, f"rank {rank} alone x {users} users", mix_entries(ctx, rank), users, ctx.config.phase_s
        )
        alone.extra["rank"] = rank
        alone_phases.append(alone)
        in_mix = [r for r in mix_phase.records if r.rank == rank]
        rows.append(compare_row(rank, summarize(in_mix, mix_phase.summary["wall_s"]), alone.summary))
    result.tables["per-rank latency: in the mix vs alone"] = rows
    result.phases += alone_phases
    alone_tok_s = [p.summary["output_tok_s"] for p in alone_phases if p.summary["output_tok_s"]]
    result.tables["throughput"] = [
        {
            "workload": f"mix of {len(mix_phase.extra['mix'])} (adapter, rank) x {users} users",
            "output_tok_s": mix_phase.summary["output_tok_s"],
            "mean of single-rank runs tok/s": statistics.fmean(alone_tok_s) if alone_tok_s else None,
        }
    ]
    result.plots.append(plots.mixed_vs_alone(rows, ctx.out / "mixed_vs_alone.png"))
    return result
