"""deploy/prometheus: the scrape config and alert rules, checked by promtool itself.

`promtool test rules` runs alerts_test.yml, which shows every alert firing and not firing on
synthetic series; the mutation cases below show those unit tests would catch a broken rule.
"""

from __future__ import annotations

import re
import shutil

import pytest
import yaml
from deploy_support import DEPLOY, base_metric, documented_metrics, run_tool

PROM = DEPLOY / "prometheus"


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", str(PROM / "prometheus.yml")],
        ["check", "rules", str(PROM / "alerts.yml")],
        ["test", "rules", str(PROM / "alerts_test.yml")],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts(tool, args):
    result = run_tool([tool("promtool"), *args], cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "old, new",
    [
        ("          ) > 2\n", "          ) > 10\n"),  # TTFT SLO threshold loosened
        ("_count[5m])) > 0.01", "_count[5m])) >= 0"),  # traffic guard dropped
        ('{status=~"5.."}', '{status=~"[45].."}'),  # 4xx counted as errors
        ('{outcome=~"miss|refused"}', '{outcome="hit"}'),
        ('{outcome=~"miss|refused"}', '{outcome="miss"}'),  # refusals (--budget-unmet refuse) not counted
        (
            "min_over_time(matryoshka_num_requests_waiting[10m]) > 0",
            "max_over_time(matryoshka_num_requests_waiting[10m]) > 0",
        ),
        ('{status="503"}', '{status="500"}'),
        ("matryoshka_kv_cache_usage_ratio > 0.95", "matryoshka_kv_cache_usage_ratio > 0.5"),
        ('up{job="matryoshka-lora"} == 0', 'up{job="matryoshka-lora"} == 1'),
    ],
    ids=[
        "ttft-threshold",
        "ttft-traffic-guard",
        "errors-4xx",
        "budget-outcome",
        "budget-refused",
        "queue-max",
        "queue-503",
        "kv",
        "down",
    ],
)
def test_unit_tests_catch_a_broken_rule(tool, tmp_path, old, new):
    rules = (PROM / "alerts.yml").read_text()
    assert rules.count(old) == 1, f"mutation target not found once: {old!r}"
    (tmp_path / "alerts.yml").write_text(rules.replace(old, new))
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    result = run_tool([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=tmp_path)
    assert result.returncode != 0, f"promtool still passes with {new!r}:\n{result.stdout}"


def _alerts() -> list[dict]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_is_tested_firing_and_silent():
    cases = [
        case
        for test in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in _alerts():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown silent"


def test_rules_use_only_documented_metrics():
    documented = documented_metrics() | {"up"}
    for rule in _alerts():
        names = {base_metric(name) for name in re.findall(r"\b(matryoshka_[a-z_]+|up)\b", rule["expr"])}
        assert names <= documented, f"{rule['alert']}: undocumented metrics {names - documented}"
