"""The HTTP API on the real native engine (tiny random Llama + tiny random adapters).

One server for the module (see conftest `native_server`); tenants: acme (alpha only, max_rank 4),
globex (all adapters), root (admin), slow (concurrency 1).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from .helpers import auth, metric_samples, sse_data

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(native_server):
    url, _ = native_server
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def generate(client, tenant="root", **body):
    body.setdefault("prompt", PROMPT)
    body.setdefault("max_tokens", 8)
    return client.post("/generate", json=body, headers=auth(tenant))


def stream_generate(client, tenant="root", **body) -> list[dict]:
    body.setdefault("prompt", PROMPT)
    body.setdefault("max_tokens", 8)
    with client.stream("POST", "/generate", json={**body, "stream": True}, headers=auth(tenant)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [json.loads(d) for d in sse_data(r.iter_lines())]


@pytest.mark.parametrize(
    "adapter,rank,tenant,served,reason",
    [
        (None, None, "root", 0, "base"),
        ("alpha", 2, "root", 2, "requested"),
        ("alpha", 8, "globex", 8, "requested"),
        ("alpha", None, "root", 8, "default"),
        ("alpha", None, "acme", 4, "default"),  # the default r_max is above acme's max_rank 4: served at 4
        ("beta", 3, "root", 3, "requested"),
    ],
)
def test_generate_serves_the_rank_and_streaming_gives_the_same_tokens(client, adapter, rank, tenant, served, reason):
    body = dict(adapter=adapter, rank=rank)
    r = generate(client, tenant, **{k: v for k, v in body.items() if v is not None})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["adapter"], out["rank"], out["rank_reason"]) == (adapter, served, reason)
    assert out["finish_reason"] in ("stop", "length") and 1 <= out["num_output_tokens"] <= 8
    assert out["num_prompt_tokens"] >= 4
    t = out["timings"]
    assert 0 <= t["queue_ms"] <= t["ttft_ms"] <= t["total_ms"]
    events = stream_generate(client, tenant, **{k: v for k, v in body.items() if v is not None})
    assert [e["type"] for e in events][0] == "start" and events[-1]["type"] == "done"
    assert (events[0]["rank"], events[0]["rank_reason"]) == (served, reason)
    streamed = "".join(e["text"] for e in events if e["type"] == "token")
    assert streamed == out["text"]  # greedy: the same tokens, token by token
    assert events[-1]["num_output_tokens"] == out["num_output_tokens"]
    assert sum(e["type"] == "token" for e in events) >= 1


def test_ranks_change_the_output_and_rank_equals_openai_model_at_rank(client):
    texts = {rank: generate(client, adapter="alpha", rank=rank, max_tokens=12).json()["text"] for rank in (1, 8)}
    base = generate(client, max_tokens=12).json()["text"]
    assert len({texts[1], texts[8], base}) == 3  # random non-zero B: every rank is another model
    r = client.post(
        "/v1/completions",
        json={"model": "alpha@8", "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
        headers=auth("root"),
    )
    assert r.json()["choices"][0]["text"] == texts[8]


def test_chat_messages_use_the_chat_template(client, native_server):
    _, app = native_server
    messages = [{"role": "user", "content": "Hi there"}]
    r = generate(client, adapter="alpha", rank=2, prompt=None, messages=messages)
    assert r.status_code == 200, r.text
    expected_ids = app.state.ctx.backend.encode_prompt(None, messages)
    assert r.json()["num_prompt_tokens"] == len(expected_ids)
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "alpha@2", "messages": messages, "max_tokens": 8, "temperature": 0},
        headers=auth("root"),
    )
    assert chat.json()["choices"][0]["message"]["content"] == r.json()["text"]


@pytest.mark.parametrize(
    "tenant,budget,rank,reason",
    [
        ("root", 1e9, 8, "budget"),  # everything fits: the highest train rank
        ("acme", 1e9, 4, "budget"),  # ... capped by the tenant's max_rank
        ("root", 1e-6, 1, "budget_unmet"),  # nothing fits: the lowest train rank
    ],
)
def test_latency_budget_picks_a_train_rank(client, tenant, budget, rank, reason):
    r = generate(client, tenant, adapter="alpha", latency_budget_ms=budget)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["rank"], out["rank_reason"], out["latency_budget_ms"]) == (rank, reason, budget)
    assert out["timings"]["predicted_latency_ms"] is not None


def test_sampling_seed_is_reproducible_and_stop_strings_cut(client):
    body = dict(adapter="alpha", rank=4, temperature=1.0, top_p=0.9, seed=7, max_tokens=16)
    first, second = generate(client, **body).json()["text"], generate(client, **body).json()["text"]
    assert first == second
    greedy = generate(client, adapter="alpha", rank=4, max_tokens=16).json()["text"]
    assert len(greedy) >= 8
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    cut = generate(client, adapter="alpha", rank=4, max_tokens=16, stop=[stop]).json()
    assert cut["finish_reason"] == "stop" and cut["text"] == greedy[: greedy.find(stop)]


FOREIGN = {
    "error": {
        "type": "permission_denied",
        "message": "adapter for tenant 'acme': 'beta' is not allowed; allowed: ['alpha']",
        "given": "beta",
        "allowed": ["alpha"],
    }
}


@pytest.mark.parametrize(
    "tenant,body,status,kind,allowed",
    [
        ("root", {"adapter": "nope"}, 404, "adapter_not_found", ["alpha", "beta"]),
        ("root", {"adapter": "alpha", "rank": 0}, 422, "validation_error", ">= 1"),
        ("root", {"adapter": "alpha", "rank": 9}, 422, "invalid_rank", None),
        ("root", {"adapter": "alpha", "rank": 2, "latency_budget_ms": 100}, 422, "validation_error", None),
        ("root", {"adapter": "alpha", "latency_budget_ms": -5}, 422, "validation_error", "> 0"),
        ("root", {"adapter": "alpha", "rank": "2"}, 422, "validation_error", None),
        ("root", {"adapter": "alpha", "max_tokens": 2.5}, 422, "validation_error", None),
        ("root", {"adapter": "alpha", "stream": "yes"}, 422, "validation_error", None),
        ("root", {"rank": 2}, 422, "validation_error", None),
        ("root", {"messages": [{"role": "user", "content": "x"}]}, 422, "validation_error", None),
        ("root", {"prompt": None}, 422, "validation_error", None),
        ("root", {"temperatur": 0.5}, 422, "validation_error", None),
        ("root", {"max_tokens": 181}, 422, "invalid_request", "1..180 (this server's limit)"),
        ("root", {"prompt": "hello " * 200}, 413, "payload_too_large", "<= 64 (this server's limit)"),
        ("acme", {"adapter": "beta"}, 403, "permission_denied", ["alpha"]),
        ("acme", {"adapter": "does-not-exist"}, 403, "permission_denied", ["alpha"]),
        ("acme", {"adapter": "alpha", "rank": 8}, 403, "permission_denied", "1..4"),
    ],
)
def test_bad_requests_say_what_is_wrong_and_what_is_allowed(client, tenant, body, status, kind, allowed):
    r = generate(client, tenant, **body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == kind and error["message"]
    if allowed is not None:
        assert error["allowed"] == allowed
    if body.get("rank") == 9:  # the engine's InvalidRankError: given 9, allowed up to r_max 8
        assert error["given"] == 9 and "8" in str(error["allowed"])


def test_a_foreign_adapter_is_not_revealed(client):
    """acme gets the same 403 for an adapter that exists (beta) and one that does not."""
    exists = generate(client, "acme", adapter="beta").json()
    missing = generate(client, "acme", adapter="zeta").json()
    assert exists == FOREIGN
    assert missing["error"]["type"] == "permission_denied" and missing["error"]["allowed"] == ["alpha"]
    assert missing["error"]["message"].replace("zeta", "beta") == exists["error"]["message"]


@pytest.mark.parametrize(
    "headers,message",
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer wrong"}, "invalid API key"),
        ({"Authorization": "Basic abc"}, "malformed"),
    ],
)
def test_missing_or_wrong_key_is_401(client, headers, message):
    for method, path in [
        ("POST", "/generate"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/adapters"),
        ("POST", "/admin/adapters"),
    ]:
        r = client.request(method, path, json={"prompt": "x", "model": "alpha", "path": "/x"}, headers=headers)
        assert r.status_code == 401 and message in r.json()["error"]["message"], (path, r.text)
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_malformed_json_is_400(client):
    r = client.post("/generate", content=b'{"prompt": ', headers={**auth("root"), "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"


def test_adapters_and_models_are_per_tenant(client):
    mine = client.get("/v1/adapters", headers=auth("acme")).json()["data"]
    assert [a["name"] for a in mine] == ["alpha"]
    assert mine[0]["accuracy"] == {"1": 0.25, "2": 0.5, "4": 0.75, "8": 0.875}
    assert (mine[0]["r_max"], mine[0]["train_ranks"], mine[0]["method"]) == (8, [1, 2, 4, 8], "matryoshka")
    assert "path" not in mine[0]
    everything = client.get("/v1/adapters", headers=auth("root")).json()["data"]
    assert sorted(a["name"] for a in everything) == ["alpha", "beta"] and all(a["path"] for a in everything)
    ids = [m["id"] for m in client.get("/v1/models", headers=auth("acme")).json()["data"]]
    base = client.get("/ready").json()["model"]
    assert ids == [base, "alpha", "alpha@1", "alpha@2", "alpha@4"]  # acme's max_rank 4 hides alpha@8
    ids = [m["id"] for m in client.get("/v1/models", headers=auth("root")).json()["data"]]
    assert set(ids) == {base, "alpha", "alpha@1", "alpha@2", "alpha@4", "alpha@8", "beta", "beta@1", "beta@2", "beta@4"}


def test_health_ready_metrics(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["model"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "vllm:num_requests_waiting" in metrics.text and "matryoshka_adapters_loaded 2.0" in metrics.text


def test_client_disconnect_aborts_the_engine_request(client, native_server, monkeypatch):
    engine = native_server[1].state.ctx.backend.engine
    aborted = []
    real_abort = engine.abort
    monkeypatch.setattr(engine, "abort", lambda key: (aborted.append(key), real_abort(key)))
    long = generate(client, adapter="alpha", rank=8, max_tokens=180).json()
    assert long["num_output_tokens"] >= 100 and aborted == []  # this greedy prompt runs long
    body = {"prompt": PROMPT, "adapter": "alpha", "rank": 8, "max_tokens": 180, "stream": True}
    with client.stream("POST", "/generate", json=body, headers=auth("root")) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines)[len("data: ") :])["type"] == "start"
    # closed after the first event: the server closes the engine's stream, which aborts the request
    samples = {}
    for _ in range(500):
        samples = metric_samples(client.get("/metrics").text)
        if aborted and samples[("matryoshka_num_requests_running", ())] == 0:
            break
        time.sleep(0.01)
    assert len(aborted) == 1 and samples[("matryoshka_num_requests_running", ())] == 0
    gone = {
        labels: v
        for (n, labels), v in samples.items()
        if n == "matryoshka_requests_total" and ("status", "499") in labels
    }
    assert gone == {(("adapter", "alpha"), ("rank", "8"), ("status", "499")): 1.0}


def test_budget_unmet_refuse_answers_503_and_counts_it(tiny_model_dir, tiny_adapters, tmp_path):
    """--budget-unmet refuse: a budget no rank is predicted to meet gets 503 budget_unmet with Retry-After
    (nothing enqueued), counted as outcome="refused"; a budget that fits is served as usual."""
    from matryoshka_lora.server import create_app

    from .conftest import native_settings
    from .helpers import serving, write_tenants

    tenants = write_tenants(tmp_path / "tenants.toml", ["alpha"])
    app = create_app(native_settings(tiny_model_dir, tiny_adapters, tenants, budget_unmet="refuse"))
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        refused = generate(c, adapter="alpha", latency_budget_ms=1e-6)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["type"] == "budget_unmet" and error["given"] == "1e-06 ms" and "rank 1" in error["allowed"]
        assert int(refused.headers["retry-after"]) >= 1
        served = generate(c, adapter="alpha", latency_budget_ms=1e9)
        assert served.status_code == 200 and served.json()["rank_reason"] == "budget"
        assert generate(c, adapter="alpha", rank=2).status_code == 200  # ranks asked for are never refused
        samples = metric_samples(c.get("/metrics").text)
    budget = "matryoshka_budget_requests_total"
    assert samples[(budget, (("adapter", "alpha"), ("outcome", "refused")))] == 1
    assert samples[(budget, (("adapter", "alpha"), ("outcome", "hit")))] == 1
    assert samples[("matryoshka_requests_total", (("adapter", "alpha"), ("rank", "none"), ("status", "503")))] == 1
    assert app.state.ctx.backend.stats().num_waiting == 0
