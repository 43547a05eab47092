"""records: SSE parsing and the status a stream counts under (it must mirror the server's counter)."""

from __future__ import annotations

import pytest

from matryoshka_lora.loadtest.records import (
    RequestRecord,
    StreamTracker,
    parse_sse_line,
    read_records,
    refused,
    write_records,
)

START = {"type": "start", "id": "g", "rank": 8, "rank_reason": "requested"}
TOKEN = {"type": "token", "id": "g", "text": "a"}


def done(finish_reason="length", num_output_tokens=3):
    return {
        "type": "done",
        "id": "g",
        "finish_reason": finish_reason,
        "num_prompt_tokens": 5,
        "num_output_tokens": num_output_tokens,
    }


@pytest.mark.parametrize(
    "line, expected",
    [
        ('data: {"type":"start","rank":4}', {"type": "start", "rank": 4}),
        (b'data: {"type":"token","text":"x"}\n', {"type": "token", "text": "x"}),
        ("data: [DONE]", None),
        ("", None),
        (": keep-alive", None),
        ("data: {not json", None),
        ("data: [1, 2]", None),
    ],
)
def test_parse_sse_line(line, expected):
    assert parse_sse_line(line) == expected


# (events with their arrival times, end time, expected status, ttft, itl gaps, finish reason)
STREAMS = [
    ([(START, 0.1), (TOKEN, 0.3), (TOKEN, 0.4), (TOKEN, 0.6), (done(), 0.7)], 0.8, 200, 0.3, [0.1, 0.2], "length"),
    ([(START, 0.1), (TOKEN, 0.2), (done("stop", 1), 0.25)], 0.3, 200, 0.2, [], "stop"),
    ([(START, 0.1), (TOKEN, 0.2), (done("abort", 1), 0.3)], 0.4, 503, 0.2, [], "abort"),
    ([(START, 0.1), (TOKEN, 0.2), ({"type": "error", "error": {"message": "boom"}}, 0.3)], 0.4, 500, 0.2, [], "error"),
    ([(START, 0.1), (TOKEN, 0.2)], 0.5, 499, 0.2, [], None),  # broke off before `done`
]


@pytest.mark.parametrize("events, end, status, ttft, gaps, finish", STREAMS)
def test_stream_tracker_mirrors_the_server_status(events, end, status, ttft, gaps, finish):
    tracker = StreamTracker(RequestRecord(adapter="a", requested_rank=8), sent=0.0)
    for event, at in events:
        tracker.on_event(event, at)
    rec = tracker.finish(end)
    assert (rec.status, rec.rank, rec.finish_reason) == (status, 8, finish)
    assert rec.ttft_s == pytest.approx(ttft)
    assert rec.itl_s == pytest.approx(gaps)
    assert rec.metric_key() == ("a", "8", str(status))
    assert rec.label == "a@8"
    ended_at = next((at for e, at in events if e["type"] in ("done", "error")), end)
    assert rec.e2e_s == pytest.approx(ended_at)


def test_tpot_is_decode_time_per_token_after_the_first():
    tracker = StreamTracker(RequestRecord(adapter=None), sent=0.0)
    for event, at in [({**START, "rank": 0}, 0.0), (TOKEN, 0.5), (TOKEN, 1.0), (done(num_output_tokens=5), 2.5)]:
        tracker.on_event(event, at)
    rec = tracker.finish(3.0)
    assert rec.tpot_s == pytest.approx((2.5 - 0.5) / 4)
    assert rec.metric_key() == ("base", "0", "200")


@pytest.mark.parametrize(
    "status, body, error",
    [
        (429, '{"error": {"type": "rate_limited", "message": "slow down"}}', "rate_limited"),
        (503, '{"error": {"type": "queue_full"}}', "queue_full"),
        (502, "<html>bad gateway</html>", "<html>bad gateway</html>"),
    ],
)
def test_refused_counts_under_no_rank(status, body, error):
    rec = refused(RequestRecord(adapter="a", requested_rank=4), status, "1", body, sent=1.0, now=1.25)
    assert rec.metric_key() == ("a", "none", str(status))
    assert (rec.error, rec.retry_after, rec.e2e_s) == (error, "1", pytest.approx(0.25))


def test_records_round_trip(tmp_path):
    records = [
        RequestRecord(adapter="a", rank=2, status=200, itl_s=[0.1, 0.2], num_output_tokens=3),
        RequestRecord(adapter=None, status=503, retry_after="1"),
    ]
    write_records(tmp_path / "r.jsonl", records)
    assert read_records(tmp_path / "r.jsonl") == records
