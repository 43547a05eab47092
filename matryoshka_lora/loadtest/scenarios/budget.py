"""budget: requests carry only `latency_budget_ms`; Poisson arrivals step up past saturation.

    probe   L_max = unloaded e2e at r_max (4 requests, one at a time)
            C_1   = rank-1 capacity: requests/s of 16 closed-loop users (32 requests)
    budget  = --budget-ms, else --budget-factor (3) x L_max
    steps   = --rates, else (0.25, 0.5, 0.75, 1.0, 1.25, 1.5) x C_1 requests/s, --duration s each (30)
    per step: budget hit rate (client e2e <= budget; refusals count as misses), the server's own
              hit rate (matryoshka_budget_requests_total), p95 e2e vs budget, mean served rank,
              share of `budget_unmet` (no rank predicted to fit: served late, or with
              --budget-unmet refuse answered 503 budget_unmet, the `refused` share), and the
              controller's learned latency margin at the step's end (matryoshka_budget_latency_margin)

Goals: (a) >= 95 % of budgeted requests meet the budget at every step below C_1 (the rate where even
rank 1 saturates the server); (b) at every step, >= 95 % of the requests the controller served with
reason `budget` (a rank predicted to fit) meet it.

`--budget-unmet refuse` starts the server with that policy: past capacity it sheds the requests no rank
can serve in time, so the ones it admits should keep their budgets (goal b).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from matryoshka_lora.loadtest import plots, prom
from matryoshka_lora.loadtest.checks import goal
from matryoshka_lora.loadtest.config import LoadTestConfig, MixEntry
from matryoshka_lora.loadtest.openloop import Arrivals, open_loop
from matryoshka_lora.loadtest.phases import RunContext, ScenarioResult, measure
from matryoshka_lora.loadtest.probe import capacity, unloaded
from matryoshka_lora.loadtest.records import RequestRecord
from matryoshka_lora.loadtest.stats import ms, percentiles

RATE_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
PROBE_USERS, PROBE_REQUESTS = 16, 32
HIT_GOAL = 0.95


def hit_rate(records: list[RequestRecord], budget_ms: float) -> float | None:
    """Share of `records` answered 200 within the budget (client-side e2e)."""
    if not records:
        return None
    return sum(1 for r in records if r.ok and r.e2e_s is not None and r.e2e_s * 1000.0 <= budget_ms) / len(records)


def step_row(offered: float, budget_ms: float, phase) -> dict:
    records = phase.records
    ok = [r for r in records if r.ok]
    fitted = [r for r in ok if r.rank_reason == "budget"]
    server_hit = phase.counter_delta("matryoshka_budget_requests_total", outcome="hit")
    server_miss = phase.counter_delta("matryoshka_budget_requests_total", outcome="miss")
    p95 = percentiles(r.e2e_s for r in ok)["p95"]
    return {
        "offered_rps": round(offered, 3),
        "achieved_rps": phase.summary["req_s"] and round(phase.summary["req_s"], 3),
        "num_requests": len(records),
        "budget_ms": round(budget_ms, 1),
        "hit_rate": hit_rate(records, budget_ms),
        "hit_rate_when_predicted": hit_rate(fitted, budget_ms),
        "server_hit_rate": server_hit / (server_hit + server_miss) if server_hit + server_miss else None,
        "e2e_p95_ms": ms(p95),
        "p95/budget": None if p95 is None else round(p95 * 1000.0 / budget_ms, 3),
        "mean_rank": phase.summary["mean_rank"],
        "budget_unmet_share": (sum(1 for r in ok if r.rank_reason == "budget_unmet") / len(ok)) if ok else None,
        "refused_share": (sum(1 for r in records if r.error == "budget_unmet") / len(records)) if records else None,
        "ranks": dict(sorted(Counter(r.rank for r in ok).items())),
        "statuses": phase.summary["statuses"],
        "margin_after": prom.gauge(phase.after, "matryoshka_budget_latency_margin"),  # None: a server without it
    }


def steps_below(rates: tuple[float, ...], rows: list[dict], capacity: float) -> list[dict]:
    """The rows of the steps offered less than `capacity`, judged on the unrounded rates: the step at
    1.0 x capacity is at it, not below it (its rounded `offered_rps` can compare below)."""
    return [row for rate, row in zip(rates, rows) if rate < capacity * (1 - 1e-9)]


def prepare(config: LoadTestConfig, out) -> dict:
    """The server this scenario starts uses --budget-unmet as given (serve: the server's default)."""
    return {"serve": {"budget_unmet": config.budget_unmet}}


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult("budget")
    adapter, cfg = ctx.primary, ctx.config
    l_max, phase = unloaded(ctx, MixEntry(adapter.name, adapter.r_max), tag="probe unloaded")
    result.phases.append(phase)
    c_1, phase = capacity(ctx, MixEntry(adapter.name, 1), PROBE_USERS, PROBE_REQUESTS, tag="probe capacity")
    result.phases.append(phase)
    budget_ms = cfg.budget_ms or cfg.budget_factor * l_max * 1000.0
    rates = cfg.rates or tuple(f * c_1 for f in RATE_FACTORS)
    result.notes.append(
        f"probe: unloaded e2e at r_max {l_max * 1000:.0f} ms, rank-1 capacity {c_1:.2f} req/s; "
        f"budget {budget_ms:.0f} ms; rates {', '.join(f'{r:.2f}' for r in rates)} req/s; "
        f"--budget-unmet {cfg.budget_unmet}" + (" (as given: a --url server's own)" if cfg.url else "")
    )
    rows = []
    entry = MixEntry(adapter.name, latency_budget_ms=round(budget_ms, 1))
    for i, rate in enumerate(rates):
        plan = ctx.plan([entry], tag=f"step {i}")
        arrivals = Arrivals(rate, cfg.phase_s, cfg.max_requests, seed=cfg.seed + i)
        phase = measure(
            ctx,
            f"budget step {i} at {rate:.2f} req/s",
            lambda plan=plan, arrivals=arrivals: asyncio.run(open_loop(ctx.url, plan, arrivals)),
            allowed_5xx=(503,),
        )
        phase.extra["offered_rps"] = rate
        result.phases.append(phase)
        rows.append(step_row(rate, budget_ms, phase))
    result.tables["budget steps"] = rows
    below = [r for r in steps_below(rates, rows, c_1) if r["hit_rate"] is not None]
    result.checks.append(
        goal(
            f">= {HIT_GOAL:.0%} within budget below rank-1 capacity ({c_1:.2f} req/s)",
            bool(below) and all(r["hit_rate"] >= HIT_GOAL for r in below),
            "; ".join(f"{r['offered_rps']} req/s: {r['hit_rate']:.1%}" for r in below) or "no step below capacity",
        )
    )
    predicted = [r for r in rows if r["hit_rate_when_predicted"] is not None]
    result.checks.append(
        goal(
            f">= {HIT_GOAL:.0%} within budget when a rank was predicted to fit",
            all(r["hit_rate_when_predicted"] >= HIT_GOAL for r in predicted),
            "; ".join(f"{r['offered_rps']} req/s: {r['hit_rate_when_predicted']:.1%}" for r in predicted) or "none",
        )
    )
    result.plots.append(plots.budget_vs_load(rows, ctx.out / "budget_rank_and_p95_vs_load.png"))
    return result
