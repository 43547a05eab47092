"""One client-side record per request, built from a streamed `POST /generate` the same way by every
load generator (Locust users under gevent, the asyncio open-loop generator).

A streamed /generate answers SSE lines `data: {"type": "start" | "token" | "done" | "error", ...}`.
`StreamTracker` turns them, with the client's arrival times, into a `RequestRecord`:

    ttft_s   = first `token` event  - request sent
    itl_s[i] = (i+1)-th token event - i-th token event      (per SSE chunk, as vLLM's bench counts ITL)
    e2e_s    = `done` / `error` / end of stream - request sent
    tpot_s   = (e2e_s - ttft_s) / (num_output_tokens - 1)   (tokens from the server's `done` event)

The status a record counts under mirrors the server's `matryoshka_requests_total{status}`: the HTTP
status for answers refused before the engine; for an accepted stream 200 when it finished, 500 when it
ended with an error event, 503 when the engine aborted it, 499 when the stream broke off.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

NO_RANK = "none"  # the server's rank label of requests that never reached the engine
STATUS_CLIENT_GONE = 499
STATUS_CONNECT_ERROR = 0  # no HTTP answer at all (refused, reset): never counted by the server


@dataclass
class RequestRecord:
    """What the client saw of one request. Times in seconds; `start` is wall-clock (time.time())."""

    adapter: str | None
    requested_rank: int | None = None
    budget_ms: float | None = None
    tag: str = ""  # the scenario's group: "flood", "trickle", a phase name, ...
    start: float = 0.0
    status: int = STATUS_CONNECT_ERROR
    rank: int | None = None  # served rank (from the `start` event)
    rank_reason: str | None = None
    finish_reason: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    num_prompt_tokens: int | None = None
    num_output_tokens: int = 0
    retry_after: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)

    @property
    def label(self) -> str:
        """`ADAPTER@RANK` with the served rank (`base@0`; `ADAPTER@none` when refused)."""
        rank = NO_RANK if self.rank is None else str(self.rank)
        return f"{self.adapter or 'base'}@{rank}"

    def metric_key(self) -> tuple[str, str, str]:
        """The (adapter, rank, status) labels the server counts this request under."""
        rank = NO_RANK if self.rank is None else str(self.rank)
        return (self.adapter or "base", rank, str(self.status))


def parse_sse_line(line: str | bytes) -> dict | None:
    """`data: {...}` -> the JSON object; anything else (blank lines, comments, `[DONE]`) -> None."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if not payload or payload == "[DONE]":
        return None
    try:
        value = json.loads(payload)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class StreamTracker:
    """Feed it the SSE events of one accepted (HTTP 200) stream with their arrival times; `finish()`
    fills the record. `sent` is the perf-counter time the request was sent."""

    def __init__(self, record: RequestRecord, sent: float):
        self.record, self.sent = record, sent
        self.last_token_at: float | None = None
        self.ended = False

    def on_event(self, event: dict, now: float) -> None:
        kind, rec = event.get("type"), self.record
        if kind == "start":
            rec.rank, rec.rank_reason = event.get("rank"), event.get("rank_reason")
        elif kind == "token":
            if rec.ttft_s is None:
                rec.ttft_s = now - self.sent
            else:
                rec.itl_s.append(now - self.last_token_at)
            self.last_token_at = now
        elif kind == "done":
            rec.finish_reason = event.get("finish_reason")
            rec.num_prompt_tokens = event.get("num_prompt_tokens")
            rec.num_output_tokens = int(event.get("num_output_tokens") or 0)
            self._end(now, {"abort": 503}.get(rec.finish_reason, 200))
        elif kind == "error":
            rec.finish_reason = "error"
            rec.error = str((event.get("error") or {}).get("message", "engine error"))
            self._end(now, 500)

    def _end(self, now: float, status: int) -> None:
        if not self.ended:
            self.ended = True
            self.record.e2e_s = now - self.sent
            self.record.status = status

    def finish(self, now: float, error: str | None = None) -> RequestRecord:
        """The stream is over (or broke off with `error`): a stream without `done` counts as 499."""
        if not self.ended:
            self.record.error = error or "the stream ended before its done event"
            self._end(now, STATUS_CLIENT_GONE)
        return self.record


def refused(
    record: RequestRecord, status: int, retry_after: str | None, body: str, sent: float, now: float
) -> RequestRecord:
    """Fill `record` for an answer refused before the engine (4xx/5xx with a JSON error body)."""
    record.status, record.retry_after, record.e2e_s = status, retry_after, now - sent
    try:
        record.error = str(json.loads(body)["error"]["type"])
    except (ValueError, KeyError, TypeError):
        record.error = body[:200]
    return record


def write_records(path: Path, records: Iterable[RequestRecord]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(asdict(rec), separators=(",", ":")) + "\n")


def read_records(path: Path) -> list[RequestRecord]:
    if not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [RequestRecord(**json.loads(line)) for line in f if line.strip()]
