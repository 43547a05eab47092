"""Reading the server's `/metrics` (names: docs/architecture.md): counters before/after a phase, and
gauges (and the server's RSS) sampled in the background while it runs.

    before = scrape(url); ...run...; after = scrape(url)
    request_delta(before, after) == Counter(r.metric_key() for r in records)   # to the request
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
REQUESTS_TOTAL = "matryoshka_requests_total"
WAITING, RUNNING = "matryoshka_num_requests_waiting", "matryoshka_num_requests_running"


def parse(text: str) -> Samples:
    """Prometheus text -> {(sample name, sorted label items): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(url: str, timeout_s: float = 10.0) -> Samples:
    response = httpx.get(f"{url}/metrics", timeout=timeout_s)
    response.raise_for_status()
    return parse(response.text)


def request_counts(samples: Samples) -> Counter:
    """`matryoshka_requests_total` as Counter{(adapter, rank, status): n}."""
    counts: Counter = Counter()
    for (name, labels), value in samples.items():
        if name == REQUESTS_TOTAL:
            d = dict(labels)
            counts[(d.get("adapter", ""), d.get("rank", ""), d.get("status", ""))] += int(round(value))
    return counts


def request_delta(before: Samples, after: Samples) -> Counter:
    """Requests counted between two scrapes, per (adapter, rank, status); zero entries dropped."""
    delta = request_counts(after)
    delta.subtract(request_counts(before))
    return Counter({k: v for k, v in delta.items() if v != 0})


def gauge(samples: Samples, name: str) -> float | None:
    return samples.get((name, ()))


def counter_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of a counter's samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    waiting: float | None
    running: float | None
    rss_bytes: int | None


@dataclass
class Sampler:
    """A thread that scrapes the engine gauges (and `rss()`, when given) every `interval_s`."""

    url: str
    interval_s: float = 0.5
    rss: Callable[[], int | None] | None = None
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        with httpx.Client(timeout=5.0) as client:
            while not self._stop.is_set():
                waiting = running = None
                try:
                    samples = parse(client.get(f"{self.url}/metrics").text)
                    waiting, running = gauge(samples, WAITING), gauge(samples, RUNNING)
                except httpx.HTTPError as exc:
                    log.debug("metrics scrape failed: %s", exc)
                rss = self.rss() if self.rss is not None else None
                self.samples.append(Sample(time.monotonic() - started, waiting, running, rss))
                self._stop.wait(self.interval_s)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def max_waiting(self) -> float | None:
        values = [s.waiting for s in self.samples if s.waiting is not None]
        return max(values) if values else None
