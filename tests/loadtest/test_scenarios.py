"""Short smoke runs of rank-sweep, budget, overload and soak against a real `serve` subprocess (tiny
model). They assert the invariants (counters match to the request, no unexpected 5xx, bounded queue,
Retry-After on refusals, accepted requests complete), the served ranks, and the report files; never a
speed."""

from __future__ import annotations

import importlib.util
import json

import pytest

from matryoshka_lora.loadtest import runner
from matryoshka_lora.loadtest.config import LoadTestConfig, Workload

from .conftest import SERVER_MAX_NUM_SEQS, SERVER_MAX_QUEUE_LEN

pytestmark = pytest.mark.timeout(300)
# Locust runs in a subprocess (never imported here: it would gevent-patch pytest's process).
needs_locust = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None, reason="Locust is not installed (pip install -e '.[loadtest]')"
)


def smoke_config(scenario, server, model_dir, adapters, out, **overrides) -> LoadTestConfig:
    values = dict(
        scenario=scenario,
        out=out,
        url=server.url,
        model=str(model_dir),
        adapters=[adapters],
        duration_s=2.0,
        workload=Workload(prompt_tokens=16, output_tokens=8),
        users=(2,),
        max_num_seqs=SERVER_MAX_NUM_SEQS,
        max_queue_len=SERVER_MAX_QUEUE_LEN,
        num_threads=1,
    )
    values.update(overrides)
    return LoadTestConfig(**values)


def invariants(result) -> dict[str, list[bool]]:
    """check name (without its phase) -> passed, for every invariant of every phase."""
    out: dict[str, list[bool]] = {}
    for check in result.all_checks():
        if check.kind == "invariant":
            out.setdefault(check.name.split(" (", 1)[0], []).append(check.passed)
    return out


def failed(result) -> list[tuple[str, str]]:
    return [(c.name, c.detail) for c in result.all_checks() if c.kind == "invariant" and c.passed is not True]


def assert_report(result, md_path, num_phases):
    data = json.loads((md_path.parent / "result.json").read_text())
    assert data["passed"] is True and len(data["phases"]) == num_phases
    assert md_path.read_text().startswith(f"# Load test `{result.scenario}`: all invariants hold")
    for plot in result.plots:
        assert plot.is_file() and plot.stat().st_size > 0


@needs_locust
def test_rank_sweep(lt_server, tiny_model_dir, lt_adapters, tmp_path):
    result, md_path = runner.run(
        smoke_config("rank-sweep", lt_server, tiny_model_dir, lt_adapters, tmp_path, ranks=(1, 8))
    )
    checks = invariants(result)
    assert result.passed, failed(result)
    assert len(checks["counters match"]) == 3 and checks["Locust's stats agree"] == [True, True]
    assert result.phases[0].name == "warm-up"
    for phase in result.phases[1:]:  # every request served at the rank it asked for, the whole output
        assert phase.records and {(r.rank, r.rank_reason) for r in phase.records} == {
            (phase.extra["rank"], "requested")
        }
        assert {r.num_output_tokens for r in phase.records} == {8}
    rows = result.tables["latency per rank and concurrency"]
    assert [(r["rank"], r["users"]) for r in rows] == [(1, 2), (8, 2)]
    assert_report(result, md_path, 3)


def test_budget(lt_server, tiny_model_dir, lt_adapters, tmp_path):
    result, md_path = runner.run(
        smoke_config("budget", lt_server, tiny_model_dir, lt_adapters, tmp_path, rates=(2.0, 40.0))
    )
    assert result.passed, failed(result)
    steps = [p for p in result.phases if p.name.startswith("budget step")]
    assert len(steps) == 2
    for phase in steps:
        assert {r.status for r in phase.records} <= {200, 503}
        served = [r for r in phase.records if r.ok]
        assert served and all(r.rank_reason in ("budget", "budget_unmet") and r.rank in (1, 2, 4, 8) for r in served)
    rows = result.tables["budget steps"]
    assert [r["offered_rps"] for r in rows] == [2.0, 40.0]
    assert len([c for c in result.checks if c.kind == "goal"]) == 2
    assert_report(result, md_path, 5)


def test_overload(lt_server, tiny_model_dir, lt_adapters, tmp_path):
    result, md_path = runner.run(
        smoke_config("overload", lt_server, tiny_model_dir, lt_adapters, tmp_path, duration_s=3.0)
    )
    assert result.passed, failed(result)
    checks = invariants(result)
    assert checks["bounded queue"] == [True] and checks["429/503 carry Retry-After"] == [True]
    overload = next(p for p in result.phases if p.name.startswith("overload at"))
    assert {r.status for r in overload.records} <= {200, 429, 503}
    assert all(r.retry_after for r in overload.records if r.status in (429, 503))
    assert all(r.finish_reason == "length" for r in overload.records if r.ok)
    assert_report(result, md_path, 5)


@needs_locust
def test_soak_samples_the_server_memory(lt_server, tiny_model_dir, lt_adapters, tmp_path):
    from matryoshka_lora.loadtest.scenarios import soak

    config = smoke_config("soak", lt_server, tiny_model_dir, lt_adapters, tmp_path, duration_s=4.0)
    config.out.mkdir(parents=True, exist_ok=True)
    ctx = runner.build_context(config, lt_server.url, lt_server, {}, runner.adapter_dirs_by_name([lt_adapters]))
    result = soak.run(ctx)
    assert result.passed, failed(result)
    row = result.tables["soak"][0]
    assert row["rss_start_mib"] > 0 and row["rss_max_mib"] >= row["rss_end_mib"]
    rss_goal = next(c for c in result.checks if c.name.startswith("server RSS flat"))
    assert rss_goal.passed is not None  # evaluated (its verdict is a goal, not asserted here)


def test_tenants_starts_its_own_server_with_a_tenants_file(tiny_model_dir, lt_adapters, tmp_path):
    """No --url: the run writes a tenants file with fresh keys and starts `serve` with it. The trickle is
    never refused in either loaded phase, the flood gets 429s with Retry-After, the neighbour uses the
    flood's key within its limits; the goal compares the flood phase with the neighbour phase."""
    config = LoadTestConfig(
        scenario="tenants",
        out=tmp_path,
        model=str(tiny_model_dir),
        adapters=[lt_adapters],
        duration_s=3.0,
        workload=Workload(prompt_tokens=16, output_tokens=8),
        num_threads=1,
    )
    result, md_path = runner.run(config)
    assert result.passed, failed(result)
    names = [p.name for p in result.phases]
    assert names[-3:] == ["trickle alone", "trickle + neighbour within limits", "trickle + flood"]
    checks = invariants(result)
    assert checks["trickle is never refused"] == [True, True] and checks["flood gets 429s"] == [True]
    polite, flood = result.phases[-2], result.phases[-1]
    assert {r.tag for r in polite.records} == {"trickle", "neighbour"}
    assert any(r.ok for r in polite.records if r.tag == "neighbour")
    assert checks["the neighbour within its limits is never refused"] == [True]
    assert {r.status for r in flood.records if r.tag == "flood"} <= {200, 429}
    rows = result.tables["tenants"]
    assert [r["other_tenant"] for r in rows] == [None, "neighbour", "flood"]
    (isolation,) = [c for c in result.checks if c.kind == "goal"]
    assert "beside the neighbour" in isolation.name and isolation.passed is not None
    assert_report(result, md_path, len(result.phases))


def test_budget_with_refuse_starts_its_server_with_the_policy(tiny_model_dir, lt_adapters, tmp_path):
    """--budget-unmet refuse reaches the server it starts: with a 1 ms budget no rank ever fits, so every
    budgeted request is answered 503 budget_unmet (with Retry-After), counted to the request."""
    config = LoadTestConfig(
        scenario="budget",
        out=tmp_path,
        model=str(tiny_model_dir),
        adapters=[lt_adapters],
        duration_s=2.0,
        workload=Workload(prompt_tokens=16, output_tokens=8),
        num_threads=1,
        budget_ms=1.0,
        rates=(4.0,),
        budget_unmet="refuse",
    )
    result, md_path = runner.run(config)
    assert result.passed, failed(result)
    (step,) = [p for p in result.phases if p.name.startswith("budget step")]
    assert step.records and {(r.status, r.error) for r in step.records} == {(503, "budget_unmet")}
    assert all(r.retry_after for r in step.records)
    assert step.counter_delta("matryoshka_budget_requests_total", outcome="refused") == len(step.records)
    (row,) = result.tables["budget steps"]
    assert row["refused_share"] == 1.0 and row["hit_rate"] == 0.0
    assert "--budget-unmet refuse" in " ".join(result.notes)
    assert_report(result, md_path, len(result.phases))
