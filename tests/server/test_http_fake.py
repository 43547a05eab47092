"""HTTP-layer behaviour that needs a scripted engine (exact timing, failures, a full queue).

The real engine runs in test_native_*.py; here `FakeBackend` (same protocol) makes disconnects, queue
saturation and engine failures deterministic.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from matryoshka_lora.server import ServerSettings, create_app

from .fake_backend import FakeBackend
from .helpers import auth, metric_samples, serving, sse_data


def wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def fake_server(tenants_path):
    backend = FakeBackend(token_delay_s=0.02)
    app = create_app(ServerSettings(tenants=tenants_path, adapters=[]), backend=backend)
    with serving(app) as url:
        yield url, backend


def count(url, status: str) -> float:
    samples = metric_samples(httpx.get(f"{url}/metrics").text)
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "matryoshka_requests_total" and dict(labels)["status"] == status
    )


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_the_engine_request_at_once(fake_server, stream):
    url, backend = fake_server
    body = {"prompt": "hi", "adapter": "alpha", "max_tokens": 500, "stream": stream}  # 10 s of tokens
    with httpx.Client(base_url=url, timeout=0.3) as client:
        if stream:
            with client.stream("POST", "/generate", json=body, headers=auth("root")) as response:
                lines = response.iter_lines()
                assert json.loads(next(lines)[len("data: ") :])["type"] == "start"
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/generate", json=body, headers=auth("root"))
    assert wait_for(lambda: len(backend.aborted) == 1 and not backend.in_flight, 2.0)
    assert wait_for(lambda: count(url, "499") == 1, 2.0)
    assert count(url, "200") == 0


def test_queue_full_is_503_with_retry_after(tenants_path):
    backend = FakeBackend(max_in_flight=0)
    with serving(create_app(ServerSettings(tenants=tenants_path, adapters=[]), backend=backend)) as url:
        r = httpx.post(f"{url}/generate", json={"prompt": "hi"}, headers=auth("root"))
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["type"] == "queue_full"


@pytest.mark.parametrize(
    "path,body,stream",
    [
        ("/generate", {"prompt": "hi", "max_tokens": 2}, False),
        ("/generate", {"prompt": "hi", "max_tokens": 2, "stream": True}, True),
        ("/v1/completions", {"model": "fake-base", "prompt": "hi", "max_tokens": 2, "stream": True}, True),
    ],
)
def test_engine_error_is_500_or_an_error_event(tenants_path, path, body, stream):
    backend = FakeBackend(fail_with="kaboom")
    with serving(create_app(ServerSettings(tenants=tenants_path, adapters=[]), backend=backend)) as url:
        if not stream:
            r = httpx.post(f"{url}{path}", json=body, headers=auth("root"))
            assert r.status_code == 500 and r.json()["error"] == {
                "type": "engine_error",
                "message": "the engine failed on this request: kaboom",
            }
        else:
            with httpx.stream("POST", f"{url}{path}", json=body, headers=auth("root")) as r:
                data = sse_data(r.iter_lines())
            errors = [json.loads(d) for d in data if d != "[DONE]" and "error" in json.loads(d)]
            assert r.status_code == 200 and len(errors) == 1 and "kaboom" in json.dumps(errors[0])
        assert count(url, "500") == 1


def test_tenant_concurrency_limit_is_429_while_one_is_in_flight(fake_server):
    url, backend = fake_server
    with httpx.Client(base_url=url, timeout=10) as client:
        with client.stream(
            "POST", "/generate", json={"prompt": "hi", "max_tokens": 20, "stream": True}, headers=auth("slow")
        ) as first:
            lines = first.iter_lines()  # keep the iterator: dropping it closes the stream
            next(lines)
            second = client.post("/generate", json={"prompt": "hi", "max_tokens": 1}, headers=auth("slow"))
            assert second.status_code == 429 and second.headers["Retry-After"] == "1"
            assert "concurrency" in second.json()["error"]["message"]
            list(lines)
        assert client.post("/generate", json={"prompt": "hi", "max_tokens": 1}, headers=auth("slow")).status_code == 200


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate", {"prompt": "hi", "max_tokens": 2, "stream": True}),
        ("/v1/completions", {"model": "fake-base", "prompt": "hi", "max_tokens": 2, "stream": True}),
    ],
)
def test_a_client_at_its_concurrency_limit_may_send_its_next_request_at_once(fake_server, path, body):
    """The tenant's slot is free before the stream's last event is sent, so a closed-loop client with
    max_concurrency 1 that sends its next request the moment a stream ends is never refused."""
    url, _ = fake_server
    statuses = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(30):
            with client.stream("POST", path, json=body, headers=auth("slow")) as r:
                r.read()
                statuses.append(r.status_code)
    assert statuses == [200] * 30


def test_a_refused_prompt_frees_the_tenant_slot(tenants_path):
    """The tenant's limits are taken before the prompt is tokenized; a prompt refused after that (413,
    too long) gives the concurrency slot back, so a tenant limited to 1 is not locked out by it."""
    app = create_app(ServerSettings(tenants=tenants_path, adapters=[], max_prompt_tokens=4), backend=FakeBackend())
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        too_long, short = {"prompt": "one two three four five", "max_tokens": 1}, {"prompt": "one two", "max_tokens": 1}
        for _ in range(3):
            r = client.post("/generate", json=too_long, headers=auth("slow"))
            assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
        assert client.post("/generate", json=short, headers=auth("slow")).status_code == 200
    assert app.state.ctx.limiter.num_in_flight["slow"] == 0


def test_rate_limit_is_429_with_retry_after(fake_server):
    url, _ = fake_server
    statuses = [
        httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 1}, headers=auth("limited")) for _ in range(3)
    ]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert int(statuses[2].headers["Retry-After"]) >= 90  # 0.01 requests/s: a token every 100 s
    assert statuses[2].json()["error"]["type"] == "rate_limited"


def test_tenant_and_budget_reach_the_engine(fake_server):
    url, backend = fake_server
    r = httpx.post(
        f"{url}/generate",
        json={"prompt": "a b c", "adapter": "alpha", "latency_budget_ms": 10_000, "max_tokens": 1},
        headers=auth("acme"),
    )
    assert r.status_code == 200
    sent = backend.received[-1]
    assert (sent.tenant, sent.max_rank, sent.latency_budget_ms, sent.rank) == ("acme", 4, 10_000, None)
    assert (r.json()["rank"], r.json()["rank_reason"]) == (4, "budget")  # capped at acme's max_rank


def test_not_ready_until_started_and_during_drain(tenants_path):
    backend = FakeBackend()
    app = create_app(ServerSettings(tenants=tenants_path, adapters=[]), backend=backend)
    with serving(app) as url:
        assert httpx.get(f"{url}/ready").status_code == 200
        app.state.ctx.draining = True
        r = httpx.post(f"{url}/generate", json={"prompt": "hi"}, headers=auth("root"))
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready" and "Retry-After" in r.headers
        assert httpx.get(f"{url}/ready").status_code == 503
        assert httpx.get(f"{url}/health").status_code == 200


def test_body_limit_counts_chunked_bodies_too(tenants_path):
    app = create_app(ServerSettings(tenants=tenants_path, adapters=[], max_body_bytes=2048), backend=FakeBackend())

    def chunks():
        for _ in range(10):
            yield b" " * 500

    with serving(app) as url:
        r = httpx.post(
            f"{url}/generate", content=chunks(), headers={**auth("root"), "content-type": "application/json"}
        )
        assert r.status_code == 413 and r.json()["error"]["allowed"] == "<= 2048 bytes"
        small = httpx.post(f"{url}/generate", json={"prompt": "x" * 1000, "max_tokens": 1}, headers=auth("root"))
        assert small.status_code == 200
        assert count(url, "413") == 1


def test_openapi_declares_models_and_errors(fake_server):
    url, _ = fake_server
    spec = httpx.get(f"{url}/openapi.json").json()
    gen = spec["paths"]["/generate"]["post"]
    assert gen["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/GenerateRequest")
    assert {"200", "400", "401", "403", "404", "413", "422", "429", "500", "503"} <= set(gen["responses"])
    assert gen["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/adapters",
        "/admin/adapters",
        "/admin/adapters/{name}",
        "/health",
        "/ready",
        "/metrics",
    ):
        assert path in spec["paths"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


class FailingBackend(FakeBackend):
    async def start(self) -> None:
        raise RuntimeError("no weights here")


def test_engine_start_failure_fails_health_and_refuses_requests(tenants_path):
    app = create_app(ServerSettings(tenants=tenants_path, adapters=[]), backend=FailingBackend())
    with serving(app, ready_status=503) as url:
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "no weights here" in health.json()["error"]["message"]
        assert httpx.get(f"{url}/ready").status_code == 503
        r = httpx.post(f"{url}/generate", json={"prompt": "hi"}, headers=auth("root"))
        assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"


@pytest.mark.parametrize(
    "raw,status,given",
    [
        (b'{"prompt": "hi", "adapter": "alpha", "latency_budget_ms": Infinity}', 422, "inf"),
        (b'{"prompt": "hi", "adapter": "alpha", "latency_budget_ms": NaN}', 422, "nan"),
        (b'{"prompt": 123}', 422, 123),
        (b'{"prompt": "hi", "adapter": "' + b"a" * 300 + b'"}', 422, "a" * 200 + "... (300 characters)"),
        (b'["prompt"]', 422, None),
        (b'"just a string"', 422, None),
    ],
)
def test_odd_json_gets_a_4xx_with_a_short_echo(fake_server, raw, status, given):
    url, _ = fake_server
    r = httpx.post(f"{url}/generate", content=raw, headers={**auth("root"), "content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"].get("given") == given
