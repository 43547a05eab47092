"""The published request schemas state the rules the server enforces: for each body, the JSON Schema in
the OpenAPI (checked by jsonschema_rs, what schemathesis validates with) and the server's pydantic
validation agree on valid vs invalid."""

from __future__ import annotations

import pydantic
import pytest

jsonschema_rs = pytest.importorskip("jsonschema_rs", reason="the dev extra installs it (with schemathesis)")

from matryoshka_lora.server.schemas import GenerateRequest  # noqa: E402
from matryoshka_lora.server.schemas_openai import ChatCompletionRequest, CompletionRequest  # noqa: E402

MSG = [{"role": "user", "content": "hi"}]
CASES = [
    # (model, body, valid)
    (GenerateRequest, {"prompt": "x"}, True),
    (GenerateRequest, {"messages": MSG}, True),
    (GenerateRequest, {"prompt": "x", "messages": MSG}, False),
    (GenerateRequest, {}, False),
    (GenerateRequest, {"prompt": None, "messages": MSG}, True),
    (GenerateRequest, {"prompt": None, "messages": None}, False),
    (GenerateRequest, {"prompt": "x", "adapter": "a", "rank": 2}, True),
    (GenerateRequest, {"prompt": "x", "adapter": "a", "latency_budget_ms": 500.0}, True),
    (GenerateRequest, {"prompt": "x", "adapter": "a", "rank": 2, "latency_budget_ms": 500.0}, False),
    (GenerateRequest, {"prompt": "x", "adapter": "a", "rank": None, "latency_budget_ms": 500.0}, True),
    (GenerateRequest, {"prompt": "x", "rank": 2}, False),
    (GenerateRequest, {"prompt": "x", "adapter": None, "latency_budget_ms": 5.0}, False),
    (GenerateRequest, {"prompt": "x", "rank": None}, True),
    (GenerateRequest, {"prompt": "x", "stop": ["a"] * 8}, True),
    (GenerateRequest, {"prompt": "x", "stop": ["a"] * 9}, False),
    (GenerateRequest, {"prompt": "x", "rank": 0, "adapter": "a"}, False),
    (GenerateRequest, {"prompt": "x", "nope": 1}, False),
    (CompletionRequest, {"model": "m", "prompt": "x"}, True),
    (CompletionRequest, {"model": "m", "prompt": ["x"]}, True),
    (CompletionRequest, {"model": "m", "prompt": []}, False),
    (CompletionRequest, {"model": "m", "prompt": ["x", "y"]}, False),
    (CompletionRequest, {"model": "m", "prompt": ""}, False),
    (CompletionRequest, {"model": "m", "prompt": [""]}, False),
    (CompletionRequest, {"model": "m", "prompt": "x", "echo": True}, False),
    (CompletionRequest, {"model": "m", "prompt": "x", "echo": False}, True),
    (CompletionRequest, {"model": "m", "prompt": "x", "echo": 0}, False),
    (CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 1}, False),
    (CompletionRequest, {"model": "m", "prompt": "x", "rank": 1, "latency_budget_ms": 9.0}, False),
    (CompletionRequest, {"model": "m", "prompt": "x", "extra": 1}, True),
    (ChatCompletionRequest, {"model": "m", "messages": MSG, "rank": 4}, True),
    (ChatCompletionRequest, {"model": "m", "messages": MSG, "rank": 4, "latency_budget_ms": 9.0}, False),
    (ChatCompletionRequest, {"model": "m", "messages": []}, False),
]


def validator(model: type[pydantic.BaseModel]):
    schema = model.model_json_schema(mode="validation")
    return jsonschema_rs.validator_for(schema)


@pytest.mark.parametrize(("model", "body", "valid"), CASES)
def test_schema_and_server_agree(model, body, valid):
    try:
        model.model_validate(body)
        accepted = True
    except pydantic.ValidationError:
        accepted = False
    assert accepted == valid
    assert validator(model).is_valid(body) == valid
