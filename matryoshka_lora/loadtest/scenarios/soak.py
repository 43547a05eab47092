"""soak: moderate closed-loop load for a long time (--duration, default 600 s); the server's RSS is
sampled (every duration/120 s, at least 0.5 s) and must stay flat.

    load      4 Locust users (the middle of --users), the mix of the `mixed` scenario
    RSS       fit rss(t) = a + b t over the second half of the run (after warm-up growth)
    flat      |b| x (duration / 2) <= max(5 % of median RSS, 32 MiB)
    drift     e2e p50 of the first and the last 10 % of requests (reported)

RSS needs a server this run started (with --url there is no process to read: reported as missing).
"""

from __future__ import annotations

import statistics

import numpy as np

from matryoshka_lora.loadtest import plots, prom
from matryoshka_lora.loadtest.checks import goal
from matryoshka_lora.loadtest.phases import RunContext, ScenarioResult
from matryoshka_lora.loadtest.scenarios.mixed import mix_entries
from matryoshka_lora.loadtest.scenarios.rank_sweep import locust_phase
from matryoshka_lora.loadtest.stats import ms

MIB = 1024 * 1024
FLAT_SHARE, FLAT_MIN_BYTES = 0.05, 32 * MIB


def rss_trend(times_s: list[float], rss: list[float]) -> dict:
    """Slope (bytes/s) of RSS over the second half of the samples, and what it adds over that half."""
    half = len(times_s) // 2
    t, y = np.asarray(times_s[half:], dtype=float), np.asarray(rss[half:], dtype=float)
    if t.size < 2 or t[-1] == t[0]:
        return {"slope_bytes_per_s": None, "growth_bytes": None, "median_bytes": float(np.median(rss)) if rss else None}
    slope = float(np.polyfit(t, y, 1)[0])
    return {
        "slope_bytes_per_s": slope,
        "growth_bytes": slope * float(t[-1] - t[0]),
        "median_bytes": float(np.median(y)),
    }


def run(ctx: RunContext) -> ScenarioResult:
    result = ScenarioResult("soak")
    users = sorted(ctx.config.users)[len(ctx.config.users) // 2]
    duration = ctx.config.phase_s
    rss_of = ctx.server.rss_bytes if ctx.server is not None else None
    with prom.Sampler(ctx.url, interval_s=max(0.5, duration / 120), rss=rss_of) as sampler:
        phase = locust_phase(ctx, f"soak x {users} users", mix_entries(ctx), users, duration)
    result.phases.append(phase)
    samples = [s for s in sampler.samples if s.rss_bytes is not None]
    ordered = sorted((r for r in phase.records if r.ok), key=lambda r: r.start)
    tenth = max(1, len(ordered) // 10)
    first = statistics.median(r.e2e_s for r in ordered[:tenth]) if ordered else None
    last = statistics.median(r.e2e_s for r in ordered[-tenth:]) if ordered else None
    row = {
        "users": users,
        "duration_s": duration,
        "num_requests": len(phase.records),
        "e2e_p50_first_10pct_ms": ms(first),
        "e2e_p50_last_10pct_ms": ms(last),
    }
    if samples:
        times, rss = [s.t for s in samples], [float(s.rss_bytes) for s in samples]
        trend = rss_trend(times, rss)
        row.update(
            rss_start_mib=round(rss[0] / MIB, 1),
            rss_end_mib=round(rss[-1] / MIB, 1),
            rss_max_mib=round(max(rss) / MIB, 1),
            rss_slope_mib_per_min=None
            if trend["slope_bytes_per_s"] is None
            else round(trend["slope_bytes_per_s"] * 60 / MIB, 3),
        )
        growth, median = trend["growth_bytes"], trend["median_bytes"]
        allowed = max(FLAT_SHARE * (median or 0.0), FLAT_MIN_BYTES)
        result.checks.append(
            goal(
                "server RSS flat (no leak)",
                growth is not None and abs(growth) <= allowed,
                f"second-half growth {0 if growth is None else growth / MIB:.1f} MiB "
                f"(allowed {allowed / MIB:.1f} MiB), {len(samples)} samples",
            )
        )
        result.plots.append(plots.rss_over_time(times, [v / MIB for v in rss], ctx.out / "soak_rss.png"))
    else:
        result.notes.append("no RSS samples: the server was not started by this run (--url)")
    result.tables["soak"] = [row]
    return result
