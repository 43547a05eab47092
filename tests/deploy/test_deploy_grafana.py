"""deploy/grafana: the "Latency per rank" dashboard against Grafana's schema, its PromQL through
Prometheus's own parser (promtool), and its provisioning files.

The live check (every query returns series from a real server) is test_deploy_dashboard_live.py.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from deploy_support import DASHBOARD, DEPLOY, base_metric, documented_metrics, missing, panel_queries, render, run_tool

GRAFANA = DEPLOY / "grafana"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def schema_errors():
    try:
        import grafana_foundation_sdk  # noqa: F401
    except ImportError:
        missing("grafana-foundation-sdk is not installed")
    from dashboard_schema import schema_errors

    return schema_errors


def test_dashboard_conforms_to_grafana_schema(dashboard, schema_errors):
    assert schema_errors(dashboard) == []


def _set(path: str, value):
    """A mutation that sets dashboard[path] (dotted, list indices as numbers) to value."""

    def mutate(dashboard: dict) -> None:
        *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
        node = dashboard
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (_set("panelz", []), "dashboard.panelz: not in the schema"),
        (_set("graphTooltip", 7), "graph_tooltip: 7 is not one of"),
        (_set("panels.1.gridPos.w", "12"), "grid_pos.w: expected int"),
        (_set("panels.1.type", "timeserie"), "is not a known panel plugin"),
        (_set("panels.1.options.legend.displayMode", "bogus"), "display_mode: 'bogus' is not one of"),
        (_set("panels.1.fieldConfig.defaults.custom.drawStyle", "zigzag"), "draw_style: 'zigzag'"),
        (_set("panels.1.targets.0.exprr", "up"), "targets[0].exprr: not in the schema"),
        (_set("templating.list.1.type", "querry"), "type_val: 'querry' is not one of"),
    ],
    ids=["unknown-key", "enum", "type", "panel-type", "panel-option", "field-config", "query-key", "variable"],
)
def test_schema_check_rejects_a_broken_dashboard(dashboard, schema_errors, mutate, expected):
    broken = copy.deepcopy(dashboard)
    mutate(broken)
    errors = schema_errors(broken)
    assert any(expected in error for error in errors), errors


def test_every_query_parses_with_prometheus(tool, dashboard, tmp_path):
    """promtool parses each panel query (template variables substituted) as a recording rule."""
    queries = panel_queries(dashboard)
    rules = [{"record": f"dashboard:query_{i}", "expr": render(query.expr)} for i, query in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_tool([tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_queries_use_only_documented_metrics(dashboard):
    documented = documented_metrics()
    for query in panel_queries(dashboard):
        names = {base_metric(name) for name in re.findall(r"\bmatryoshka_[a-z_]+", query.expr)}
        assert names and names <= documented, f"{query.panel}: {names - documented or 'no metric'}"


def test_dashboard_covers_every_served_metric(dashboard):
    used = {
        base_metric(name)
        for query in panel_queries(dashboard)
        for name in re.findall(r"\bmatryoshka_[a-z_]+", query.expr)
    }
    assert {name for name in documented_metrics() if name.startswith("matryoshka_")} - used == set()


@pytest.mark.parametrize(
    "histogram",
    [
        "matryoshka_time_to_first_token_seconds",
        "matryoshka_time_per_output_token_seconds",
        "matryoshka_request_latency_seconds",
    ],
)
def test_latency_quantiles_by_rank_and_adapter(dashboard, histogram):
    exprs = [query.expr for query in panel_queries(dashboard) if f"{histogram}_bucket" in query.expr]
    for quantile in ("0.5", "0.95", "0.99"):
        matching = [e for e in exprs if e.startswith(f"histogram_quantile({quantile}, sum by (rank, le)")]
        assert matching, f"no p{quantile} by rank of {histogram}"
        assert all('adapter=~"$adapter"' in e for e in matching)


def test_adapter_variable_lists_adapters_with_all(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    adapter = variables["adapter"]
    assert (adapter["includeAll"], adapter["allValue"], adapter["multi"]) == (True, ".*", True)
    assert adapter["query"]["query"] == "label_values(matryoshka_requests_total, adapter)"
    assert variables["datasource"]["query"] == "prometheus"


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "matryoshka.yml").read_text())
    (provider,) = providers["providers"]
    assert (provider["type"], provider["options"]["path"]) == ("file", "/var/lib/grafana/dashboards")
