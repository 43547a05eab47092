"""What every scenario is made of: a run context, and measured phases.

phase = measure(ctx, "rank 8 x 16 users", lambda: run_locust(...).records)
    scrape /metrics -> run -> scrape /metrics (again until the server has counted every request)
    -> records saved as JSON lines, summary (stats.summarize), standard checks (checks.standard)
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from matryoshka_lora.loadtest import prom
from matryoshka_lora.loadtest.checks import Check, standard
from matryoshka_lora.loadtest.config import LoadTestConfig, MixEntry, Workload
from matryoshka_lora.loadtest.plan import Plan
from matryoshka_lora.loadtest.records import STATUS_CONNECT_ERROR, RequestRecord, write_records
from matryoshka_lora.loadtest.stats import summarize

log = logging.getLogger(__name__)

COUNTER_SETTLE_S = 10.0  # the server counts a stream when it closes, just after the client saw its end


@dataclass
class AdapterSpec:
    name: str
    r_max: int
    train_ranks: tuple[int, ...]


@dataclass
class RunContext:
    """Everything a scenario needs: where the server is, what to send, where to write."""

    config: LoadTestConfig
    url: str
    out: Path
    prompt: str
    prompt_ids: list[int]
    workload: Workload
    adapters: list[AdapterSpec]
    server: object | None = None  # a ServerProcess when this run started the server
    api_key: str | None = None
    state: dict = field(default_factory=dict)  # what a scenario's prepare() handed over
    notes: list[str] = field(default_factory=list)

    @property
    def primary(self) -> AdapterSpec:
        return self.adapters[0]

    def sweep_ranks(self, adapter: AdapterSpec | None = None) -> list[int]:
        """--ranks, else 1, 8, 32 and r_max (those an adapter has)."""
        adapter = adapter or self.primary
        wanted = self.config.ranks or (1, 8, 32, adapter.r_max)
        return sorted({r for r in wanted if 1 <= r <= adapter.r_max})

    def plan(
        self, mix: list[MixEntry], tag: str = "", max_requests: int | None = None, api_key: str | None = None
    ) -> Plan:
        w = self.workload
        return Plan(
            mix=[m.entry() for m in mix],
            prompt=self.prompt,
            max_tokens=w.output_tokens,
            temperature=w.temperature,
            ignore_eos=w.ignore_eos,
            max_requests=max_requests or self.config.max_requests,
            api_key=api_key or self.api_key,
            seed=self.config.seed,
            tag=tag,
        )


@dataclass
class Phase:
    name: str
    summary: dict
    checks: list[Check]
    records_path: Path
    extra: dict = field(default_factory=dict)
    records: list[RequestRecord] = field(default_factory=list, repr=False)
    before: prom.Samples = field(default_factory=dict, repr=False)  # /metrics around the phase
    after: prom.Samples = field(default_factory=dict, repr=False)

    def counter_delta(self, name: str, **labels: str) -> float:
        return prom.counter_sum(self.after, name, **labels) - prom.counter_sum(self.before, name, **labels)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "checks": [asdict(c) for c in self.checks],
            "records": str(self.records_path),
            **self.extra,
        }


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def settled_delta(url: str, before: prom.Samples, records: list[RequestRecord]) -> tuple[Counter, prom.Samples]:
    """(request delta, last scrape): scrape until the server's request count reaches the client's (or
    COUNTER_SETTLE_S passes)."""
    expected = sum(1 for r in records if r.status != STATUS_CONNECT_ERROR)
    deadline = time.monotonic() + COUNTER_SETTLE_S
    while True:
        after = prom.scrape(url)
        delta = prom.request_delta(before, after)
        if sum(delta.values()) >= expected or time.monotonic() > deadline:
            return delta, after
        time.sleep(0.1)


def measure(
    ctx: RunContext,
    name: str,
    run: Callable[[], list[RequestRecord]],
    allowed_5xx: tuple[int, ...] = (),
    wall_s: float | None = None,
) -> Phase:
    """Run one phase between two /metrics scrapes; save its records; summarize and check it."""
    before = prom.scrape(ctx.url)
    records = run()
    delta, after = settled_delta(ctx.url, before, records)
    path = ctx.out / "records" / f"{slug(name)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    write_records(path, records)
    summary = summarize(records, wall_s)
    checks = standard(records, delta, name, allowed_5xx)
    failed = [c.name for c in checks if not c.passed]
    log.info(
        "%s: %d requests, %s tok/s%s",
        name,
        len(records),
        f"{summary['output_tok_s']:.1f}" if summary["output_tok_s"] else "-",
        f", FAILED: {failed}" if failed else "",
    )
    return Phase(name, summary, checks, path, records=records, before=before, after=after)


@dataclass
class ScenarioResult:
    """What a scenario hands to the report: its phases, tables (name -> rows), checks and goals, plots."""

    scenario: str
    phases: list[Phase] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def all_checks(self) -> list[Check]:
        return [c for p in self.phases for c in p.checks] + self.checks

    @property
    def passed(self) -> bool:
        """Every invariant held (goals are reported, not required)."""
        return all(c.passed is True for c in self.all_checks() if c.kind == "invariant")
