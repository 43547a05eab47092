"""The Locust user of every closed-loop scenario: streamed `POST /generate` requests drawn from a mix.

Run by the orchestrator as `locust -f <this file> --headless ...` in a subprocess (gevent patches only
that process), with the plan in the JSON file named by $MATRYOSHKA_LOADTEST_PLAN; or interactively
through loadtests/locustfile.py with the web UI, the plan then coming from the custom options below.

Each request reports Locust events named `ADAPTER@SERVED_RANK`, so that every Locust statistic is
per rank:

    request_type E2E   response_time = request sent -> last SSE event,  response_length = output tokens
    request_type TTFT  request sent -> first token event
    request_type TPOT  (E2E - TTFT) / (output tokens - 1)
    request_type ITL   one event per gap between token events

and appends its RequestRecord to the plan's records file (JSON lines). The run stops by itself after
`max_requests` requests (or Locust's --run-time), the last user quitting once nothing is in flight.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import asdict

import gevent
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

from matryoshka_lora.loadtest.plan import PLAN_ENV, Plan, parse_mix, read_plan
from matryoshka_lora.loadtest.records import RequestRecord, StreamTracker, parse_sse_line, refused

CSV_CATCH_UP_S = 1.5  # Locust rewrites its CSV files every second: let them see the last request


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    """Options of interactive runs (ignored when $MATRYOSHKA_LOADTEST_PLAN names a plan file)."""
    parser.add_argument(
        "--mix",
        default="",
        help="Requests to draw from, e.g. alpha@1,alpha@8,beta@budget=500 "
        "(overrides --adapter/--rank/--latency-budget-ms)",
    )
    parser.add_argument("--adapter", default="", help="Adapter name; empty = the base model")
    parser.add_argument("--rank", type=int, default=0, help="Rank to serve; 0 = none (r_max, or the budget)")
    parser.add_argument("--latency-budget-ms", type=float, default=0.0, help="Latency budget instead of a rank")
    parser.add_argument("--max-tokens", type=int, default=64, help="Output tokens per request")
    parser.add_argument("--prompt", default="", help="Prompt text; empty = the documented fixed prompt")
    parser.add_argument("--ignore-eos", action="store_true", help="Generate max-tokens tokens even past EOS")
    parser.add_argument("--api-key", default="", help="Bearer key (a server with a tenants file)", is_secret=True)
    parser.add_argument("--records", default="", include_in_web_ui=False, help="Append request records here")


class _State:
    """Per-process counters shared by the users (one gevent thread: no locks)."""

    def __init__(self) -> None:
        self.plan: Plan | None = None
        self.issued = 0
        self.in_flight = 0
        self.quitting = False
        self.user_ids = itertools.count()
        self.records_file = None

    def load_plan(self, environment) -> Plan:
        """The plan file (read once), else the current options (the web UI may change them between runs)."""
        path = os.environ.get(PLAN_ENV)
        if path is None:
            self.plan = plan_from_options(environment.parsed_options)
        elif self.plan is None:
            self.plan = read_plan(path)
        return self.plan

    def write(self, record: RequestRecord) -> None:
        if not self.plan.records:
            return
        if self.records_file is None:
            self.records_file = open(self.plan.records, "a", encoding="utf-8")
        self.records_file.write(json.dumps(asdict(record), separators=(",", ":")) + "\n")
        self.records_file.flush()


STATE = _State()


def plan_from_options(options) -> Plan:
    from matryoshka_lora.loadtest.prompts import PROMPT_TEXT

    mix = (
        parse_mix(options.mix)
        if options.mix
        else [
            {
                "adapter": options.adapter or None,
                "rank": options.rank or None,
                "latency_budget_ms": options.latency_budget_ms or None,
                "weight": 1.0,
            }
        ]
    )
    return Plan(
        mix=mix,
        prompt=options.prompt or PROMPT_TEXT,
        max_tokens=options.max_tokens,
        ignore_eos=options.ignore_eos,
        api_key=options.api_key or None,
        records=options.records or None,
    )


def fire(environment, request_type: str, name: str, seconds: float, length: int = 0) -> None:
    environment.events.request.fire(
        request_type=request_type,
        name=name,
        response_time=seconds * 1000.0,
        response_length=length,
        exception=None,
        context={},
    )


class MatryoshkaUser(FastHttpUser):
    """One closed-loop client: send, read the whole stream, send the next (no think time)."""

    wait_time = constant(0)
    network_timeout = 600.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.plan = STATE.load_plan(self.environment)
        self.rng = random.Random(self.plan.seed * 1_000_003 + next(STATE.user_ids))
        self.weights = [float(e.get("weight", 1.0)) for e in self.plan.mix]

    @task
    def generate(self) -> None:
        if STATE.issued >= self.plan.max_requests:
            if STATE.in_flight == 0 and not STATE.quitting and self.environment.runner is not None:
                STATE.quitting = True
                gevent.spawn_later(CSV_CATCH_UP_S, self.environment.runner.quit)
            raise StopUser()
        entry = self.rng.choices(self.plan.mix, weights=self.weights)[0]
        STATE.issued += 1
        STATE.in_flight += 1
        try:
            record = self.send(entry)
        finally:
            STATE.in_flight -= 1
        STATE.write(record)

    def send(self, entry: dict) -> RequestRecord:
        record = RequestRecord(
            adapter=entry.get("adapter"),
            requested_rank=entry.get("rank"),
            budget_ms=entry.get("latency_budget_ms"),
            tag=self.plan.tag,
            start=time.time(),
        )
        headers = {"Accept": "text/event-stream"}
        if self.plan.api_key:
            headers["Authorization"] = f"Bearer {self.plan.api_key}"
        sent = time.perf_counter()
        with self.client.request(
            "POST",
            "/generate",
            json=self.plan.body(entry),
            headers=headers,
            stream=True,
            catch_response=True,
            name=record.label,
        ) as resp:
            if resp.status_code == 200:
                read_stream(resp, StreamTracker(record, sent))
            else:
                try:
                    text = resp.text or ""
                except Exception as exc:  # a connection error has no body
                    text = repr(exc)
                refused(
                    record,
                    resp.status_code or 0,
                    resp.headers.get("retry-after") if resp.headers else None,
                    text,
                    sent,
                    time.perf_counter(),
                )
            meta = resp.request_meta
            meta.update(
                request_type="E2E",
                name=record.label,
                response_time=(record.e2e_s or 0.0) * 1000.0,
                response_length=record.num_output_tokens,
            )
            if record.ok:
                resp.success()
            else:
                resp.failure(f"HTTP {record.status} {record.error or ''}".strip())
        if record.ok:
            fire(self.environment, "TTFT", record.label, record.ttft_s or 0.0)
            if record.tpot_s is not None:
                fire(self.environment, "TPOT", record.label, record.tpot_s)
            for gap in record.itl_s:
                fire(self.environment, "ITL", record.label, gap)
        return record


def read_stream(resp, tracker: StreamTracker) -> None:
    """Read SSE lines as they arrive (geventhttpclient's readline does not wait for a full buffer)."""
    raw = resp._response
    try:
        while True:
            line = raw.readline(b"\n")
            if not line:
                break
            event = parse_sse_line(line)
            if event is not None:
                tracker.on_event(event, time.perf_counter())
        tracker.finish(time.perf_counter())
    except Exception as exc:  # reset, timeout: the server counts 499
        tracker.finish(time.perf_counter(), error=repr(exc))
