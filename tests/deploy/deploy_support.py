"""Helpers for the deploy tests: locate the real tools that consume the artefacts, read the dashboard.

A missing tool fails the test under CI (where .ci/deploy_deps.sh installs it) and skips it, with the
reason, on a developer machine (`CI` unset). Fixtures live in conftest.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ARCHITECTURE_DOC = REPO / "docs" / "architecture.md"


def missing(reason: str, hint: str = ".ci/deploy_deps.sh installs it") -> None:
    """Fail under CI, skip elsewhere: CI installs every tool with .ci/deploy_deps.sh."""
    message = f"{reason} ({hint})"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def find_tool(name: str) -> str:
    """The path of an executable on PATH or beside the running interpreter (venv tools), else skip/fail."""
    beside = Path(sys.executable).parent / name
    path = shutil.which(name) or (str(beside) if beside.is_file() else None)
    if path is None:
        missing(f"{name} is not installed")
    return path


def run_tool(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run a tool, capturing text output (never raises on a non-zero exit)."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def documented_metrics() -> set[str]:
    """Every metric name in docs/architecture.md's "Prometheus metrics" section (the server's contract)."""
    text = ARCHITECTURE_DOC.read_text()
    section = text.split("### Prometheus metrics", 1)[1]
    return set(re.findall(r"`((?:matryoshka_|vllm:)[a-z_:]+)", section))


def base_metric(name: str) -> str:
    """The metric family of a series name: histograms expose `_bucket`, `_count` and `_sum`."""
    return re.sub(r"_(bucket|count|sum)$", "", name)


DASHBOARD = DEPLOY / "grafana" / "dashboards" / "latency-per-rank.json"


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str

    @property
    def per_rank(self) -> bool:
        """A panel query that aggregates `by (rank, ...)`: every series it returns carries `rank`."""
        return re.search(r"by \((?:[a-z_]+, )*rank\b", self.expr) is not None


def panel_queries(dashboard: dict) -> list[PanelQuery]:
    """Every PromQL expression of every panel (rows included), in dashboard order."""
    out = []
    for panel in dashboard["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                out.append(PanelQuery(sub["title"], target["refId"], target["expr"]))
    return out


def render(expr: str, adapter: str = ".*", rate_interval: str = "1m") -> str:
    """Substitute the dashboard's template variables as Grafana would (`.*` is the "All" value)."""
    return expr.replace("$__rate_interval", rate_interval).replace("$adapter", adapter)
