"""tenants: one tenant floods past its limits while another sends a steady trickle.

A tenants file with fresh random keys is written to OUT/tenants.toml and the server started with it:

    flood    rate_limit_rps 2, burst 2, max_concurrency 2   sends 20 req/s (10 x its rate limit)
    trickle  no limits                                        sends T = max(0.2 / L_0, 10 / duration) req/s
                                                              (20 % busy alone, and >= ~10 requests a phase)

    probe    L_0 = the trickle's unloaded e2e (4 requests at rank 8 or r_max, one at a time)
    phase 1  trickle alone, --duration s (60)
    phase 2  trickle + neighbour: the flood's key used *within* its limits (2 closed-loop users, each
             sending its next request when the last ends but at most one each 1.1 s, so the two stay
             under the rate limit however fast the server answers; honouring Retry-After), --duration s
    phase 3  trickle + flood together, --duration s

Invariants: no 5xx at all; the flood gets 429s (with Retry-After); the trickle and the neighbour get none.
Goal (isolation): the trickle's p50 e2e under the flood within 20 % of its p50 beside the neighbour.
The flood's excess must cost the trickle nothing: what the flood's allowed requests cost it (they
share every decode step, and their prompts' prefill steps) is what its limits allow, and is reported
(both loaded phases against the trickle alone) but not judged. Not measured when a phase got no
trickle request.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from pathlib import Path

from matryoshka_lora.loadtest.checks import Check, goal, refusals_have_retry_after
from matryoshka_lora.loadtest.config import LoadTestConfig, MixEntry
from matryoshka_lora.loadtest.openloop import Arrivals, closed_loop, open_loop
from matryoshka_lora.loadtest.phases import RunContext, ScenarioResult, measure
from matryoshka_lora.loadtest.probe import unloaded
from matryoshka_lora.loadtest.stats import ms, percentiles, summarize

FLOOD_LIMITS = {"rate_limit_rps": 2.0, "burst": 2, "max_concurrency": 2}
FLOOD_FACTOR = 10.0  # the flood sends this many times its rate limit
TRICKLE_UTILISATION = 0.2
MIN_TRICKLE_REQUESTS = 10  # per phase, expected: on a slow machine 0.2 / L_0 alone may send none in a phase
LATENCY_TOLERANCE = 0.20
# each of the neighbour's clients starts a request at most this often, so the two stay 10 % under the rate limit
NEIGHBOUR_INTERVAL_S = 1.1 * FLOOD_LIMITS["max_concurrency"] / FLOOD_LIMITS["rate_limit_rps"]


def write_tenants(path: Path, keys: dict[str, str]) -> Path:
    from matryoshka_lora.server.tenants import hash_key

    limits = "\n".join(f"{k} = {v}" for k, v in FLOOD_LIMITS.items())
    path.write_text(
        f"""# written by `matryoshka-lora loadtest tenants` (random keys, this run only)
[tenants.flood]
api_key_sha256 = "{hash_key(keys["flood"])}"
adapters = "*"
{limits}

[tenants.trickle]
api_key_sha256 = "{hash_key(keys["trickle"])}"
adapters = "*"
""",
        encoding="utf-8",
    )
    return path


def prepare(config: LoadTestConfig, out: Path) -> dict:
    keys = {name: secrets.token_urlsafe(24) for name in ("flood", "trickle")}
    path = write_tenants(out / "tenants.toml", keys)
    return {"serve": {"tenants": path}, "api_key": keys["trickle"], "state": {"keys": keys}}


def p50(records) -> float | None:
    return percentiles(r.e2e_s for r in records if r.ok)["p50"]


def trickle_of(phase) -> list:
    return [r for r in phase.records if r.tag == "trickle"]


def phase_row(phase, other: str | None, alone_p50: float | None) -> dict:
    """The trickle's latency in `phase`, and what the other tenant (tag `other`) got."""
    served = [r for r in trickle_of(phase) if r.ok]
    e2e = percentiles(r.e2e_s for r in served)
    others = [r for r in phase.records if other and r.tag == other]
    return {
        "phase": phase.name,
        "trickle_requests": len(served),
        "trickle_p50_ms": ms(e2e["p50"]),
        "trickle_p95_ms": ms(e2e["p95"]),
        "trickle_p50_vs_alone": round(e2e["p50"] / alone_p50, 3) if alone_p50 and e2e["p50"] else None,
        "other_tenant": other,
        "other_statuses": dict(sorted(Counter(str(r.status) for r in others).items())),
        "other_output_tok_s": summarize(others, phase.summary["wall_s"])["output_tok_s"],
    }


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult("tenants")
    cfg, keys = ctx.config, ctx.state["keys"]
    adapter = ctx.primary
    entry = MixEntry(adapter.name, min(8, adapter.r_max))
    l_0, phase = unloaded(ctx, entry, tag="probe trickle")
    result.phases.append(phase)
    trickle_rate = max(TRICKLE_UTILISATION / l_0, MIN_TRICKLE_REQUESTS / cfg.phase_s)
    flood_rate = FLOOD_FACTOR * FLOOD_LIMITS["rate_limit_rps"]
    trickle = ctx.plan([entry], tag="trickle", api_key=keys["trickle"])
    flood = ctx.plan([entry], tag="flood", api_key=keys["flood"])
    arrivals = Arrivals(trickle_rate, cfg.phase_s, cfg.max_requests, seed=cfg.seed)
    alone = measure(ctx, "trickle alone", lambda: asyncio.run(open_loop(ctx.url, trickle, arrivals)))
    result.phases.append(alone)

    async def trickle_beside(neighbour):
        trickle_records, other_records = await asyncio.gather(open_loop(ctx.url, trickle, arrivals), neighbour)
        return trickle_records + other_records

    neighbour = ctx.plan([entry], tag="neighbour", api_key=keys["flood"])
    polite = measure(
        ctx,
        "trickle + neighbour within limits",
        lambda: asyncio.run(
            trickle_beside(
                closed_loop(
                    ctx.url,
                    neighbour,
                    FLOOD_LIMITS["max_concurrency"],
                    cfg.max_requests,
                    cfg.seed + 2,
                    cfg.phase_s,
                    min_interval_s=NEIGHBOUR_INTERVAL_S,
                )
            )
        ),
    )
    result.phases.append(polite)
    flood_arrivals = Arrivals(flood_rate, cfg.phase_s, cfg.max_requests, seed=cfg.seed + 1)
    loaded = measure(
        ctx, "trickle + flood", lambda: asyncio.run(trickle_beside(open_loop(ctx.url, flood, flood_arrivals)))
    )
    result.phases.append(loaded)
    flood_records = [r for r in loaded.records if r.tag == "flood"]
    num_429 = sum(1 for r in flood_records if r.status == 429)
    loaded.checks.append(
        Check("flood gets 429s", num_429 > 0, f"{num_429} of {len(flood_records)} flood requests answered 429")
    )
    for phase in (polite, loaded):
        refused_trickle = [r for r in phase.records if r.tag == "trickle" and r.status != 200]
        phase.checks += [
            Check("trickle is never refused", not refused_trickle, f"{len(refused_trickle)} trickle requests not 200"),
            refusals_have_retry_after(phase.records),
        ]

    refused_neighbour = [r for r in polite.records if r.tag == "neighbour" and r.status != 200]
    polite.checks.append(
        Check(
            "the neighbour within its limits is never refused",
            not refused_neighbour,
            f"{len(refused_neighbour)} neighbour requests not 200",
        )
    )
    base, beside, under = p50(alone.records), p50(trickle_of(polite)), p50(trickle_of(loaded))
    name = f"trickle p50 under the flood within {LATENCY_TOLERANCE:.0%} of beside the neighbour within limits"
    if base is None or beside is None or under is None:
        result.checks.append(Check(name, None, "not measured: a phase completed no trickle request", "goal"))
    else:
        result.checks.append(
            goal(
                name,
                under <= (1 + LATENCY_TOLERANCE) * beside,
                f"beside the neighbour {ms(beside)} ms, under the flood {ms(under)} ms "
                f"({under / beside:.2f}x); alone {ms(base)} ms",
            )
        )
    rows = [phase_row(phase, other, base) for phase, other in ((alone, None), (polite, "neighbour"), (loaded, "flood"))]
    result.tables["tenants"] = rows
    result.notes.append(
        f"trickle: {trickle_rate:.3f} req/s; flood: {flood_rate:g} req/s against limits "
        f"{FLOOD_LIMITS}; neighbour: the same key, "
        f"{FLOOD_LIMITS['max_concurrency']} closed-loop users, each at most one request per {NEIGHBOUR_INTERVAL_S:g} s"
    )
    return result
