"""The invariants every scenario asserts, and the goals it reports (met or not).

An invariant failing means the server misbehaved (a lost request, a 5xx, an unbounded queue); a goal
is a performance target that a slow or busy machine may miss. Both carry a one-line detail.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from matryoshka_lora.loadtest.records import STATUS_CONNECT_ERROR, RequestRecord


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: a goal that could not be evaluated (e.g. a peer not measured)
    detail: str
    kind: Literal["invariant", "goal"] = "invariant"


def goal(name: str, passed: bool, detail: str) -> Check:
    return Check(name, passed, detail, "goal")


def counters_match(server_delta: Counter, records: list[RequestRecord], phase: str = "") -> Check:
    """The server's `matryoshka_requests_total` delta equals the client's count, per (adapter, rank, status)."""
    client = Counter(r.metric_key() for r in records if r.status != STATUS_CONNECT_ERROR)
    keys = sorted(set(client) | set(server_delta))
    wrong = {
        "/".join(k): {"client": client.get(k, 0), "server": server_delta.get(k, 0)}
        for k in keys
        if client.get(k, 0) != server_delta.get(k, 0)
    }
    name = f"counters match{f' ({phase})' if phase else ''}"
    if wrong:
        return Check(name, False, f"per adapter/rank/status, client vs server: {wrong}")
    return Check(name, True, f"{sum(client.values())} requests in {len(keys)} (adapter, rank, status) series")


def all_answered(records: list[RequestRecord]) -> Check:
    """Every request got an HTTP answer (no refused or reset connection)."""
    lost = [r.error for r in records if r.status == STATUS_CONNECT_ERROR]
    return Check(
        "every request answered",
        not lost,
        f"{len(lost)} without an HTTP answer: {lost[:3]}" if lost else f"{len(records)} answered",
    )


def no_server_errors(records: list[RequestRecord], allowed: tuple[int, ...] = ()) -> Check:
    """No 5xx answer except the `allowed` ones (503 = back-pressure where a scenario expects it)."""
    bad = Counter(r.status for r in records if r.status >= 500 and r.status not in allowed)
    what = "no 5xx" + (f" but {', '.join(map(str, allowed))}" if allowed else "")
    return Check(what, not bad, f"got {dict(bad)}" if bad else f"{len(records)} requests")


def refusals_have_retry_after(records: list[RequestRecord], statuses: tuple[int, ...] = (429, 503)) -> Check:
    """Every 429/503 answer carries a Retry-After header."""
    refused = [r for r in records if r.status in statuses]
    missing = sum(1 for r in refused if not r.retry_after)
    return Check(
        "429/503 carry Retry-After",
        missing == 0,
        f"{missing} of {len(refused)} without Retry-After" if missing else f"{len(refused)} refusals",
    )


def accepted_complete(records: list[RequestRecord]) -> Check:
    """Every request the engine accepted (a rank was served) finished normally (stop or length)."""
    accepted = [r for r in records if r.rank is not None]
    unfinished = Counter(
        r.finish_reason or f"status {r.status}"
        for r in accepted
        if not (r.ok and r.finish_reason in ("stop", "length"))
    )
    return Check(
        "every accepted request completes",
        not unfinished,
        f"unfinished: {dict(unfinished)}" if unfinished else f"{len(accepted)} accepted, all finished",
    )


def bounded_queue(max_waiting: float | None, limit: int) -> Check:
    """The engine's waiting queue (sampled gauge) never exceeded `limit`."""
    if max_waiting is None:
        return Check("bounded queue", False, "no matryoshka_num_requests_waiting sample")
    return Check("bounded queue", max_waiting <= limit, f"max waiting {max_waiting:.0f} (limit {limit})")


def standard(
    records: list[RequestRecord], server_delta: Counter, phase: str = "", allowed_5xx: tuple[int, ...] = ()
) -> list[Check]:
    """The checks of every phase: counters match, all answered, no unexpected 5xx, accepted ones complete."""
    return [
        counters_match(server_delta, records, phase),
        all_answered(records),
        no_server_errors(records, allowed_5xx),
        accepted_complete(records),
    ]
