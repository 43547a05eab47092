"""Open-loop load (asyncio, aiohttp's client): requests arrive on a Poisson clock
whether or not earlier ones are done, which Locust's closed-loop users cannot do cleanly. Also a small
closed loop for probes, and bursts (N requests at once, as the in-process peers are measured).

    arrival times: t_0 = 0; t_{i+1} = t_i + Exp(rate)  while t < duration_s and i < max_requests
    each arrival: draw a mix entry (seeded), stream `POST /generate`, keep its RequestRecord
    wait for every request in flight (each bounded by `request_timeout_s`)

    burst: request i takes plan.mix[i % len(mix)]; all N sent at once (their window, first send ->
           last end, is the burst's wall clock)

The client runs on the cores of the server it measures: aiohttp costs ~0.1 ms of CPU per short request
here, httpx ~1.5 ms (benchmarks/bench_http_clients.py).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import aiohttp

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.loadtest.plan import Plan
from matryoshka_lora.loadtest.records import RequestRecord, StreamTracker, parse_sse_line, refused

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 600.0
KEEPALIVE_S = 4.0  # idle pooled connections close before uvicorn drops them (after 5 s)
HTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)  # no (whole) answer: refused, reset, timed out


class HttpStatusError(Exception):
    """An answer with an unexpected status (raised where success is expected)."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status, self.body = status, body


@dataclass(frozen=True)
class Arrivals:
    """A Poisson arrival process of `rate_rps` requests/s for `duration_s`, at most `max_requests`."""

    rate_rps: float
    duration_s: float
    max_requests: int = 1_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.rate_rps > 0:
            raise ConfigError("arrival rate", self.rate_rps, "requests/s > 0")
        if not self.duration_s > 0:
            raise ConfigError("duration", self.duration_s, "seconds > 0")

    def times(self) -> list[float]:
        """Arrival offsets in seconds from the start."""
        rng, t, out = random.Random(self.seed), 0.0, []
        while len(out) < self.max_requests:
            t += rng.expovariate(self.rate_rps)
            if t >= self.duration_s:
                break
            out.append(t)
        return out


def make_client(url: str) -> aiohttp.ClientSession:
    """One keep-alive pool, no limit on connections: each request is bounded by REQUEST_TIMEOUT_S."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=10.0)
    return aiohttp.ClientSession(url, connector=connector, timeout=timeout)


async def lines(resp: aiohttp.ClientResponse):
    """The body's lines, decoded, without their line ends."""
    async for raw in resp.content:
        yield raw.decode("utf-8", errors="replace").rstrip("\r\n")


async def send(client: aiohttp.ClientSession, plan: Plan, entry: dict) -> RequestRecord:
    """One streamed `POST /generate`; never raises for HTTP trouble (the record says what happened)."""
    record = RequestRecord(
        adapter=entry.get("adapter"),
        requested_rank=entry.get("rank"),
        budget_ms=entry.get("latency_budget_ms"),
        tag=plan.tag,
        start=time.time(),
    )
    headers = {"accept": "text/event-stream"}
    if plan.api_key:
        headers["authorization"] = f"Bearer {plan.api_key}"
    sent = time.perf_counter()
    try:
        async with client.post("/generate", json=plan.body(entry), headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.read()).decode("utf-8", errors="replace")
                return refused(record, resp.status, resp.headers.get("retry-after"), text, sent, time.perf_counter())
            tracker = StreamTracker(record, sent)
            try:
                async for line in lines(resp):
                    event = parse_sse_line(line)
                    if event is not None:
                        tracker.on_event(event, time.perf_counter())
                tracker.finish(time.perf_counter())
            except HTTP_ERRORS as exc:
                tracker.finish(time.perf_counter(), error=repr(exc))
    except HTTP_ERRORS as exc:  # no answer at all: status 0, never counted by the server
        record.error, record.e2e_s = repr(exc), time.perf_counter() - sent
    return record


def _picker(plan: Plan, seed: int):
    rng = random.Random(seed)
    weights = [float(e.get("weight", 1.0)) for e in plan.mix]
    return lambda: rng.choices(plan.mix, weights=weights)[0]


async def open_loop(url: str, plan: Plan, arrivals: Arrivals) -> list[RequestRecord]:
    """Send `plan`'s requests at `arrivals`' times; return every record once all have ended."""
    pick = _picker(plan, arrivals.seed + 1)
    async with make_client(url) as client:
        started = time.perf_counter()
        tasks = []
        for offset in arrivals.times():
            delay = started + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, plan, pick())))
        return list(await asyncio.gather(*tasks))


async def closed_loop(
    url: str,
    plan: Plan,
    concurrency: int,
    num_requests: int,
    seed: int = 0,
    duration_s: float | None = None,
    min_interval_s: float = 0.0,
) -> list[RequestRecord]:
    """`concurrency` clients send back to back (after a refusal, once its Retry-After has passed) until
    `num_requests` requests have been sent, or with `duration_s` until that many seconds have passed
    (no request starts later). min_interval_s: a client starts a request no sooner than this after its
    previous one started (a client pacing itself to a rate limit)."""
    pick = _picker(plan, seed)
    remaining = [num_requests]
    records: list[RequestRecord] = []
    deadline = None if duration_s is None else time.perf_counter() + duration_s

    async def client_loop(client: aiohttp.ClientSession) -> None:
        while remaining[0] > 0 and (deadline is None or time.perf_counter() < deadline):
            remaining[0] -= 1
            started = time.perf_counter()
            record = await send(client, plan, pick())
            records.append(record)
            if record.retry_after:  # refused: a client that honours Retry-After waits before the next one
                await asyncio.sleep(float(record.retry_after))
            await asyncio.sleep(max(0.0, started + min_interval_s - time.perf_counter()))

    async with make_client(url) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return records


async def burst(url: str, plan: Plan, num_requests: int) -> list[RequestRecord]:
    """`num_requests` streamed requests sent at once, request i with mix entry i mod len(mix)."""
    entries = [plan.mix[i % len(plan.mix)] for i in range(num_requests)]
    async with make_client(url) as client:
        return list(await asyncio.gather(*(send(client, plan, e) for e in entries)))


@dataclass(frozen=True)
class CompletionCount:
    """What one streamed completion reported in its final usage chunk."""

    prompt_tokens: int
    completion_tokens: int


async def stream_completion(client: aiohttp.ClientSession, body: dict) -> CompletionCount:
    """One streamed `POST /v1/completions` read to `data: [DONE]`; raises on a refusal or a missing usage."""
    usage = None
    async with client.post("/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise HttpStatusError(resp.status, (await resp.read()).decode("utf-8", errors="replace"))
        async for line in lines(resp):
            chunk = parse_sse_line(line)
            if chunk is not None:
                usage = chunk.get("usage") or usage
    if not usage:
        raise ValueError("the stream ended without a usage chunk (stream_options.include_usage)")
    return CompletionCount(usage["prompt_tokens"], usage["completion_tokens"])


async def completions_burst(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    num_requests: int,
    ignore_eos: bool = True,
    extras: list[dict] | None = None,
) -> list[CompletionCount]:
    """`num_requests` greedy streamed completions of `prompt` sent at once to an OpenAI-compatible server;
    request i's body also takes extras[i % len(extras)] (e.g. another model, or llama.cpp's `lora`)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    bodies = [{**body, **extras[i % len(extras)]} if extras else body for i in range(num_requests)]
    async with make_client(url) as client:
        return list(await asyncio.gather(*(stream_completion(client, b) for b in bodies)))
