"""The admission layer: which requests it answers itself (401, 429) and which it hands to the app, with
the body unchanged. The layer wraps a recording app here, so "answered before the app" is observed, not
inferred; the last tests run the whole app under uvicorn."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import httpx
import pytest
from starlette.testclient import TestClient

from matryoshka_lora.server import ServerSettings, create_app
from matryoshka_lora.server.admission import AdmissionMiddleware
from matryoshka_lora.server.tenants import hash_key

from .fake_backend import FakeBackend, fake_adapter
from .helpers import metric_samples, serving

KEYS = {"capped": "key-capped", "busy": "key-busy", "free": "key-free"}


def write_tenants(path):
    """capped: alpha only, its one token taken; busy: its one concurrency slot taken; free: no limits."""
    path.write_text(f"""
[tenants.capped]
api_key_sha256 = "{hash_key(KEYS["capped"])}"
adapters = ["alpha"]
rate_limit_rps = 0.01
burst = 1

[tenants.busy]
api_key_sha256 = "{hash_key(KEYS["busy"])}"
max_concurrency = 1

[tenants.free]
api_key_sha256 = "{hash_key(KEYS["free"])}"
""")
    return path


class RecordingApp:
    """The inner app: answers 200 "app" and records the body it was given."""

    def __init__(self):
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"app"})


@pytest.fixture
def layer(tmp_path):
    """(TestClient over AdmissionMiddleware(RecordingApp), the recorder, the server context) with capped's
    token and busy's slot taken."""
    backend = FakeBackend(adapters={name: fake_adapter(name) for name in ("alpha", "beta")})
    asyncio.run(backend.start())
    app = create_app(ServerSettings(tenants=write_tenants(tmp_path / "tenants.toml"), adapters=[]), backend=backend)
    ctx = app.state.ctx
    by_name = {t.name: t for t in ctx.tenants.tenants}
    ctx.limiter.admit(by_name["capped"])
    ctx.limiter.admit(by_name["busy"])
    recorder = RecordingApp()
    yield TestClient(AdmissionMiddleware(recorder, ctx)), recorder, ctx


def requests_counted(ctx) -> dict[tuple[str, str], float]:
    samples = metric_samples(ctx.metrics.render().decode())
    return {
        (labels["adapter"], labels["status"]): value
        for (name, label_items), value in samples.items()
        if name == "matryoshka_requests_total" and value
        for labels in [dict(label_items)]
    }


@dataclass(frozen=True)
class Case:
    name: str
    tenant: str | None
    path: str
    body: bytes
    status: int  # 200: handed to the app
    label: str | None = None  # the adapter a refusal is counted under


def js(**fields) -> bytes:
    return json.dumps(fields).encode()


CASES = [
    Case("rate, adapter", "capped", "/generate", js(prompt="hi", adapter="alpha"), 429, "alpha"),
    Case("rate, base model", "capped", "/generate", js(prompt="hi"), 429, "base"),
    Case("rate, body not validated", "capped", "/generate", js(prompt="hi", max_tokens=-1), 429, "base"),
    Case("rate, completions ADAPTER@RANK", "capped", "/v1/completions", js(model="alpha@2", prompt="hi"), 429, "alpha"),
    Case("rate, chat base name", "capped", "/v1/chat/completions", js(model="fake-base", messages=[]), 429, "base"),
    Case("concurrency", "busy", "/generate", js(prompt="hi", adapter="beta"), 429, "beta"),
    Case("no key", None, "/generate", js(prompt="hi"), 401, "unknown"),
    Case("wrong key", "nobody", "/v1/completions", js(model="alpha", prompt="hi"), 401, "unknown"),
    # over the limit, but the app answers: what it would say first is not a 429
    Case("foreign adapter (403 first)", "capped", "/generate", js(prompt="hi", adapter="beta"), 200),
    Case("unknown adapter (404 first)", "capped", "/generate", js(prompt="hi", adapter="nope"), 200),
    Case("unknown model", "capped", "/v1/completions", js(model="nope@2", prompt="hi"), 200),
    Case("model missing", "capped", "/v1/completions", js(prompt="hi"), 200),
    Case("adapter not a string", "capped", "/generate", js(prompt="hi", adapter=5), 200),
    Case("malformed JSON", "capped", "/generate", b'{"prompt": ', 200),
    Case("JSON not an object", "capped", "/generate", b"[1]", 200),
    # not a refusal at all
    Case("within limits", "free", "/generate", js(prompt="hi", adapter="beta"), 200),
    Case("not a generation path", None, "/v1/adapters", b"{}", 200),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_what_the_layer_answers_itself(layer, case):
    client, recorder, ctx = layer
    headers = {"content-type": "application/json"}
    if case.tenant is not None:
        headers["authorization"] = f"Bearer {KEYS.get(case.tenant, 'not-a-key')}"
    r = client.post(case.path, content=case.body, headers=headers)
    assert r.status_code == case.status
    if case.status == 200:
        assert r.text == "app" and recorder.bodies == [case.body]  # handed on, body unchanged
        assert requests_counted(ctx) == {}
        return
    assert recorder.bodies == []
    error = r.json()["error"]
    if case.status == 429:
        assert error["type"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
    else:
        assert error["type"] == "authentication_error" and r.headers["WWW-Authenticate"] == "Bearer"
    assert requests_counted(ctx) == {(case.label, str(case.status)): 1.0}


def test_a_get_and_an_open_or_unready_server_go_to_the_app(tmp_path):
    recorder = RecordingApp()
    backend = FakeBackend()  # not started: not ready
    app = create_app(ServerSettings(tenants=write_tenants(tmp_path / "tenants.toml"), adapters=[]), backend=backend)
    capped = next(t for t in app.state.ctx.tenants.tenants if t.name == "capped")
    app.state.ctx.limiter.admit(capped)
    client = TestClient(AdmissionMiddleware(recorder, app.state.ctx))  # no lifespan: the recorder has none
    headers = {"authorization": f"Bearer {KEYS['capped']}"}
    assert client.post("/generate", json={"prompt": "hi"}, headers=headers).text == "app"  # the app says 503
    assert client.get("/generate", headers=headers).text == "app"  # the app says 405
    open_app = create_app(ServerSettings(adapters=[]), backend=FakeBackend())
    asyncio.run(open_app.state.ctx.backend.start())
    client = TestClient(AdmissionMiddleware(recorder, open_app.state.ctx))
    assert client.post("/generate", json={"prompt": "hi"}).text == "app"
    assert len(recorder.bodies) == 3


def test_the_served_app_refuses_early_and_answers_like_the_routes(tmp_path):
    """Under uvicorn, through the whole app: a 429 before the body is validated, a foreign adapter's 403
    before any 429, a 401; each counted once."""
    settings = ServerSettings(tenants=write_tenants(tmp_path / "tenants.toml"), adapters=[])
    app = create_app(settings, backend=FakeBackend())
    capped = {"authorization": f"Bearer {KEYS['capped']}"}
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/generate", json={"prompt": "hi", "adapter": "alpha", "max_tokens": 1}, headers=capped)
        refused = client.post("/generate", json={"prompt": "hi", "adapter": "alpha", "max_tokens": -1}, headers=capped)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "100"
        error = refused.json()["error"]
        assert error["type"] == "rate_limited" and error["allowed"] == "0.01 requests/s, burst 1"
        assert error["message"].startswith("tenant 'capped' rate limit reached (0.01 requests/s, burst 1)")
        foreign = client.post("/generate", json={"prompt": "hi", "adapter": "beta"}, headers=capped)
        assert foreign.status_code == 403 and foreign.json()["error"]["type"] == "permission_denied"
        missing = client.post("/generate", json={"prompt": "hi"})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        samples = metric_samples(client.get("/metrics").text)
    counted = {dict(k[1])["status"]: v for k, v in samples.items() if k[0] == "matryoshka_requests_total"}
    assert counted == {"200": 1.0, "429": 1.0, "403": 1.0, "401": 1.0}
