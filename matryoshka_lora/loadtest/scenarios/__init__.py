"""One module per scenario; each has `run(ctx) -> ScenarioResult` and may have
`prepare(config, out) -> {"serve": serve_args kwargs, "api_key": ..., "state": {...}}`."""

from __future__ import annotations

from matryoshka_lora.loadtest.scenarios import budget, mixed, overload, peers, rank_sweep, soak, tenants

SCENARIO_MODULES = {
    "rank-sweep": rank_sweep,
    "mixed": mixed,
    "budget": budget,
    "tenants": tenants,
    "overload": overload,
    "soak": soak,
    "peers": peers,
}
