"""The official `openai` client against the server on the real native engine (real uvicorn, loopback)."""

from __future__ import annotations

import openai
import pytest

from .helpers import KEYS

PROMPT = "The weather today"


@pytest.fixture(scope="module")
def clients(native_server):
    url, _ = native_server

    def make(tenant: str = "root", key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url}/v1", api_key=key or KEYS[tenant], max_retries=0, timeout=60)

    return make


@pytest.fixture(scope="module")
def base_name(native_server) -> str:
    return native_server[1].state.ctx.backend.model_name


def test_completion_at_a_rank_streamed_and_not(clients):
    client = clients()
    full = client.completions.create(model="alpha@2", prompt=PROMPT, max_tokens=10, temperature=0)
    assert full.model == "alpha@2" and full.object == "text_completion"
    assert full.choices[0].finish_reason in ("stop", "length") and full.choices[0].text
    assert (
        full.usage.completion_tokens >= 1
        and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    )
    assert full.model_extra["matryoshka"]["rank"] == 2
    chunks = list(
        client.completions.create(
            model="alpha@2",
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(clients):
    client = clients("globex")
    messages = [{"role": "user", "content": "Say hi"}]
    full = client.chat.completions.create(model="beta@4", messages=messages, max_tokens=10, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"
    chunks = list(
        client.chat.completions.create(model="beta@4", messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


@pytest.mark.parametrize(
    "model,extra,rank,reason",
    [
        ("alpha", {"rank": 4}, 4, "requested"),
        ("alpha", {"latency_budget_ms": 1e9}, 8, "budget"),
        ("alpha", None, 8, "default"),
        ("alpha@1", {"rank": 1}, 1, "requested"),
        ("BASE", None, 0, "base"),
    ],
)
def test_model_names_and_extra_body(clients, base_name, model, extra, rank, reason):
    model = base_name if model == "BASE" else model
    out = clients().completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, extra_body=extra)
    assert (out.model_extra["matryoshka"]["rank"], out.model_extra["matryoshka"]["rank_reason"]) == (rank, reason)


def test_same_tokens_as_generate(clients, native_server):
    import httpx

    from .helpers import auth

    url, _ = native_server
    native = httpx.post(
        f"{url}/generate", json={"prompt": PROMPT, "adapter": "beta", "rank": 1, "max_tokens": 10}, headers=auth("root")
    ).json()["text"]
    out = clients().completions.create(model="beta@1", prompt=PROMPT, max_tokens=10, temperature=0)
    assert out.choices[0].text == native


def test_models_list(clients, base_name):
    ids = [m.id for m in clients("acme").models.list()]
    assert ids == [base_name, "alpha", "alpha@1", "alpha@2", "alpha@4"]


@pytest.mark.parametrize(
    "tenant,key,model,extra,error",
    [
        ("root", "wrong-key", "alpha", None, openai.AuthenticationError),
        ("acme", None, "beta", None, openai.PermissionDeniedError),
        ("acme", None, "alpha@8", None, openai.PermissionDeniedError),
        ("root", None, "nope", None, openai.NotFoundError),
        ("root", None, "alpha@9", None, openai.UnprocessableEntityError),
        ("root", None, "alpha@2", {"rank": 4}, openai.UnprocessableEntityError),
        ("root", None, "alpha@2", {"latency_budget_ms": 5}, openai.UnprocessableEntityError),
        ("root", None, "BASE@2", None, openai.UnprocessableEntityError),
        ("root", None, "alpha", {"n": 2}, openai.UnprocessableEntityError),
    ],
)
def test_errors_map_to_openai_exceptions(clients, base_name, tenant, key, model, extra, error):
    model = model.replace("BASE", base_name)
    with pytest.raises(error) as err:
        clients(tenant, key).completions.create(model=model, prompt=PROMPT, max_tokens=2, extra_body=extra)
    assert err.value.body["message"]  # the openai client exposes our error object as `body`
