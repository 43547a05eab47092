"""checks: each invariant holds on good records and fails on the one defect it is about."""

from __future__ import annotations

from collections import Counter

import pytest

from matryoshka_lora.loadtest import checks
from matryoshka_lora.loadtest.records import RequestRecord


def rec(status=200, adapter="a", rank=8, finish="length", retry_after=None):
    return RequestRecord(
        adapter=adapter,
        rank=rank if status in (200, 500, 503) and finish else None,
        status=status,
        finish_reason=finish if status == 200 else None,
        retry_after=retry_after,
    )


GOOD = [rec(), rec(), rec(adapter=None, rank=0), rec(429, finish=None, retry_after="1")]
SERVER = Counter({("a", "8", "200"): 2, ("base", "0", "200"): 1, ("a", "none", "429"): 1})


@pytest.mark.parametrize(
    "server, passed",
    [
        (SERVER, True),
        (SERVER + Counter({("a", "8", "200"): 1}), False),  # the server counted one more
        (SERVER - Counter({("base", "0", "200"): 1}), False),  # ... one less
        (Counter({("a", "8", "200"): 3, ("a", "none", "429"): 1}), False),  # right total, wrong labels
    ],
)
def test_counters_match_to_the_request(server, passed):
    assert checks.counters_match(server, GOOD).passed is passed


def test_counters_ignore_requests_without_an_http_answer():
    lost = RequestRecord(adapter="a", status=0, error="ConnectError")
    assert checks.counters_match(SERVER, GOOD + [lost]).passed
    assert not checks.all_answered(GOOD + [lost]).passed
    assert checks.all_answered(GOOD).passed


@pytest.mark.parametrize(
    "statuses, allowed, passed",
    [
        ((200, 429), (), True),
        ((200, 503), (), False),
        ((200, 503), (503,), True),
        ((200, 500, 503), (503,), False),
    ],
)
def test_no_server_errors(statuses, allowed, passed):
    records = [RequestRecord(adapter="a", status=s) for s in statuses]
    assert checks.no_server_errors(records, allowed).passed is passed


@pytest.mark.parametrize("retry_afters, passed", [(("1", "2"), True), (("1", None), False), ((), True)])
def test_refusals_have_retry_after(retry_afters, passed):
    records = [rec()] + [rec(503, finish=None, retry_after=r) for r in retry_afters]
    assert checks.refusals_have_retry_after(records).passed is passed


@pytest.mark.parametrize(
    "record, passed",
    [
        (rec(), True),
        (rec(finish="stop"), True),
        (rec(429, finish=None), True),  # refused before the engine: not accepted
        (RequestRecord(adapter="a", rank=8, status=499), False),  # accepted, broke off
        (RequestRecord(adapter="a", rank=8, status=503, finish_reason="abort"), False),
    ],
)
def test_accepted_complete(record, passed):
    assert checks.accepted_complete([rec(), record]).passed is passed


@pytest.mark.parametrize(
    "max_waiting, limit, passed", [(3.0, 4, True), (4.0, 4, True), (5.0, 4, False), (None, 4, False)]
)
def test_bounded_queue(max_waiting, limit, passed):
    assert checks.bounded_queue(max_waiting, limit).passed is passed
