"""LIVE: every panel query of the "Latency per rank" dashboard returns series from a real server.

A real `matryoshka-lora serve` (tiny random model + tiny random adapter) and a real Prometheus (scraping
it every second, evaluating deploy/prometheus/alerts.yml) run on free loopback ports; two waves of
mixed-rank traffic go through (two, so that every counter has a sample before and after an increase and
rate() is not zero); then each panel query, with its template variables substituted as Grafana would,
runs through Prometheus's HTTP API.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from deploy_support import DASHBOARD, DEPLOY, find_tool, panel_queries, render
from live_support import (
    MIXED_TRAFFIC,
    TINY_ADAPTER,
    TINY_RANKS,
    prom_query,
    prom_scalar,
    require_server,
    send_wave,
    start_prometheus,
    stop,
    tail,
    wait_until,
    write_tiny_adapter,
)

from matryoshka_lora.loadtest.server import ServerProcess, free_port, serve_args  # noqa: E402

pytestmark = pytest.mark.slow

QUERIES = panel_queries(json.loads(DASHBOARD.read_text()))
ALL_RANKS = {"0", *map(str, TINY_RANKS)}  # "0": the base model
EXPECTED_STATUS = [404 if body.get("adapter") == "no-such-adapter" else 200 for body in MIXED_TRAFFIC]


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    """(server URL, Prometheus URL) after two waves of mixed traffic have been scraped."""
    require_server()
    prometheus = find_tool("prometheus")
    work = tmp_path_factory.mktemp("live")
    write_tiny_adapter(tiny_model_dir, work / "adapters")
    server_log = work / "server.log"
    server = ServerProcess(serve_args(str(tiny_model_dir), [work / "adapters"], num_threads=1), server_log, 180)
    server_url, prom_port = server.url, free_port()
    prom_url = f"http://127.0.0.1:{prom_port}"
    prom = start_prometheus(
        prometheus, f"127.0.0.1:{server.port}", prom_port, work, [DEPLOY / "prometheus" / "alerts.yml"]
    )
    try:
        server.start()
        wait_until(
            lambda: httpx.get(f"{prom_url}/-/ready", timeout=5).status_code == 200,
            60,
            "Prometheus",
            prom,
            work / "prometheus.log",
        )
        total = "sum(matryoshka_requests_total)"
        for wave in (1, 2):
            assert send_wave(server_url) == EXPECTED_STATUS, tail(server_log)
            wait_until(
                lambda: prom_scalar(prom_url, total) == wave * len(MIXED_TRAFFIC), 30, f"scrape after wave {wave}"
            )
        yield server_url, prom_url
    finally:
        stop(prom)
        server.stop()


def _check(prom_url: str, query, adapter: str, expected_ranks: set[str]) -> None:
    result = prom_query(prom_url, render(query.expr, adapter=adapter))
    assert result, f"{query.panel} [{query.ref_id}] returned no series: {render(query.expr, adapter=adapter)}"
    values = [float(series["value"][1]) for series in result]
    assert any(math.isfinite(value) for value in values), f"{query.panel} [{query.ref_id}]: no finite value {values}"
    if query.per_rank:
        ranks = {series["metric"].get("rank") for series in result}
        assert None not in ranks, f"{query.panel} [{query.ref_id}]: a series without a rank label"
        assert expected_ranks <= ranks, f"{query.panel} [{query.ref_id}]: ranks {ranks}, expected {expected_ranks}"


@pytest.mark.parametrize("query", QUERIES, ids=[f"{q.panel}-{q.ref_id}" for q in QUERIES])
def test_panel_returns_series_for_all_adapters(live, query):
    _check(live[1], query, ".*", ALL_RANKS)


@pytest.mark.parametrize("query", [q for q in QUERIES if "$adapter" in q.expr], ids=lambda q: f"{q.panel}-{q.ref_id}")
def test_panel_filters_by_adapter_variable(live, query):
    _check(live[1], query, TINY_ADAPTER, set(map(str, TINY_RANKS)))
    if query.per_rank:
        ranks = {series["metric"]["rank"] for series in prom_query(live[1], render(query.expr, adapter=TINY_ADAPTER))}
        assert "0" not in ranks, f"{query.panel}: the base model leaks through adapter={TINY_ADAPTER!r}"


def test_adapter_variable_query_lists_loaded_adapters(live):
    response = httpx.get(f"{live[1]}/api/v1/label/adapter/values", params={"match[]": "matryoshka_requests_total"})
    assert {TINY_ADAPTER, "base"} <= set(response.json()["data"])


def test_alert_rules_evaluate_on_real_series(live):
    """Every rule of alerts.yml evaluates without error against the live server's series."""

    def evaluated():
        groups = httpx.get(f"{live[1]}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules) else None

    rules = wait_until(evaluated, 30, "a rule evaluation")
    assert {rule["name"]: rule["health"] for rule in rules} == {rule["name"]: "ok" for rule in rules}
