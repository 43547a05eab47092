"""Every Prometheus metric of the server, in one per-app registry (names: docs/architecture.md).

Per request (labels `adapter`, `rank`; `adapter="base"`, `rank="0"` for the base model):
  histograms  matryoshka_request_latency_seconds, matryoshka_queue_time_seconds,
              matryoshka_time_to_first_token_seconds, matryoshka_time_per_output_token_seconds
  counters    matryoshka_requests_total{adapter,rank,status}   (status: HTTP code, 499 = client went away)
              matryoshka_prompt_tokens_total, matryoshka_generation_tokens_total  (completed requests)
              matryoshka_budget_requests_total{adapter,outcome} (hit: total latency <= budget; miss;
                  refused: no rank predicted to meet it, answered 503 under --budget-unmet refuse)
Engine gauges, read from `engine.stats()` at scrape time:
  matryoshka_num_requests_running, matryoshka_num_requests_waiting, matryoshka_kv_cache_usage_ratio,
  matryoshka_adapters_loaded, matryoshka_budget_latency_margin (the factor the budget controller
  multiplies its latency predictions by, learned from the requests it promised), and for the Gateway
  API Inference Extension in vLLM's names:
  vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc (a 0..1 fraction, as
  vLLM's), vllm:lora_requests_info{max_lora,running_lora_adapters,waiting_lora_adapters} = scrape time.

Requests that never reached the engine carry `rank="none"`, and `adapter="unknown"` unless the adapter
was resolved (so a client cannot blow up label cardinality with made-up names).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from matryoshka_lora.backends.base import EngineBackend
from matryoshka_lora.types import GenerationEvent

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNKNOWN_ADAPTER, NO_RANK = "unknown", "none"
BASE_ADAPTER = "base"  # the label of requests to the base model (no adapter)
# CPU latencies: milliseconds (queueing, a token) to minutes (long generations under load).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class EngineStatsCollector:
    """Engine gauges computed at scrape time from `backend.stats()` and `backend.list_adapters()`."""

    def __init__(self, backend_of: Callable[[], EngineBackend | None]):
        self.backend_of = backend_of

    def describe(self):
        return []  # gauges depend on the engine; nothing to check at registration

    def collect(self):
        backend = self.backend_of()
        if backend is None:
            return
        try:
            stats = backend.stats()
            num_adapters = len(backend.list_adapters())
        except Exception:  # an engine that is not started yet has no stats
            log.debug("engine stats unavailable", exc_info=True)
            return
        gauges = [
            ("matryoshka_num_requests_running", "Requests running in the engine.", stats.num_running),
            ("matryoshka_num_requests_waiting", "Requests waiting in the engine queue.", stats.num_waiting),
            ("matryoshka_kv_cache_usage_ratio", "Share of the KV cache in use (0..1).", stats.kv_cache_usage),
            ("matryoshka_adapters_loaded", "Adapters loaded.", num_adapters),
            (
                "matryoshka_budget_latency_margin",
                "Factor the latency-budget controller multiplies its predictions "
                "by, learned from the requests it promised (1 = none).",
                stats.budget_latency_margin,
            ),
            ("vllm:num_requests_running", "Requests running (vLLM name).", stats.num_running),
            ("vllm:num_requests_waiting", "Requests waiting (vLLM name).", stats.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100 percent (vLLM name).", stats.kv_cache_usage),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=float(value))
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters; the value is the time of the report (vLLM name).",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        max_lora = min(stats.max_num_seqs, num_adapters)  # every loaded adapter is resident
        info.add_metric(
            [str(max_lora), ",".join(stats.running_adapters), ",".join(stats.waiting_adapters)], time.time()
        )
        yield info


class ServerMetrics:
    """The per-app registry and every metric object. `backend_of()` returns the engine (or None)."""

    def __init__(self, backend_of: Callable[[], EngineBackend | None]):
        self.registry = CollectorRegistry()
        labels = ["adapter", "rank"]
        r = self.registry
        self.request_latency = Histogram(
            "matryoshka_request_latency_seconds", "Enqueue to last token.", labels, buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "matryoshka_queue_time_seconds", "Enqueue to first scheduled.", labels, buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "matryoshka_time_to_first_token_seconds",
            "Enqueue to first token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "matryoshka_time_per_output_token_seconds",
            "Mean time per token after the first.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "matryoshka_requests_total", "Generation requests by answer status.", labels + ["status"], registry=r
        )
        self.prompt_tokens = Counter(
            "matryoshka_prompt_tokens_total", "Prompt tokens of completed requests.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "matryoshka_generation_tokens_total", "Generated tokens of completed requests.", labels, registry=r
        )
        self.budget_requests = Counter(
            "matryoshka_budget_requests_total",
            "Requests with a latency budget: hit = finished within it, miss = not, refused = 503 (no rank fit).",
            ["adapter", "outcome"],
            registry=r,
        )
        self.registry.register(EngineStatsCollector(backend_of))

    def count_request(self, adapter: str, rank: str, status: int) -> None:
        self.requests.labels(adapter=adapter, rank=rank, status=str(status)).inc()

    def observe_finished(self, adapter: str, last: GenerationEvent, latency_budget_ms: float | None) -> None:
        """Record a completed request from its last event (timings in seconds)."""
        labels = dict(adapter=adapter, rank=str(last.rank))
        if last.total_s is not None:
            self.request_latency.labels(**labels).observe(last.total_s)
        if last.queue_s is not None:
            self.queue_time.labels(**labels).observe(last.queue_s)
        if last.ttft_s is not None:
            self.ttft.labels(**labels).observe(last.ttft_s)
            if last.total_s is not None and last.num_output_tokens > 1:
                self.tpot.labels(**labels).observe((last.total_s - last.ttft_s) / (last.num_output_tokens - 1))
        self.prompt_tokens.labels(**labels).inc(last.num_prompt_tokens)
        self.generation_tokens.labels(**labels).inc(last.num_output_tokens)
        if latency_budget_ms is not None and last.total_s is not None:
            outcome = "hit" if last.total_s * 1000.0 <= latency_budget_ms else "miss"
            self.budget_requests.labels(adapter=adapter, outcome=outcome).inc()

    def count_budget_refused(self, adapter: str) -> None:
        self.budget_requests.labels(adapter=adapter, outcome="refused").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
