"""The server's OpenAPI: FastAPI's, plus the rules that this server's settings and state add.

    no tenants file                     every operation: security [{}] (no API key needed)
    max_tokens, max_completion_tokens   maximum = settings.max_output_tokens (larger: 422)
    /generate's adapter, OpenAI model   examples = the adapters loaded when the schema is first built
                                        (a name that is not loaded is a 404; adapters loaded later
                                        are served but not listed here)
Built once, on the first request for it.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

MAX_TOKENS_FIELDS = {
    "GenerateRequest": ("max_tokens",),
    "CompletionRequest": ("max_tokens",),
    "ChatCompletionRequest": ("max_tokens", "max_completion_tokens"),
}


def _integer_branch(prop: dict) -> dict:
    """The integer schema inside `prop` (itself, or its anyOf branch for `int | None`)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "integer":
            return branch
    return prop


def server_openapi(app: FastAPI, ctx) -> dict:
    """The OpenAPI of `app` as its ServerContext `ctx` serves it (module docstring)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    if ctx.tenants.is_open:
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if isinstance(operation, dict) and "security" in operation:
                    operation["security"] = [{}]
    components = schema.get("components", {}).get("schemas", {})
    for name, fields in MAX_TOKENS_FIELDS.items():
        for field in fields:
            prop = components.get(name, {}).get("properties", {}).get(field)
            if prop is not None:
                _integer_branch(prop)["maximum"] = ctx.settings.max_output_tokens
    names = [a.name for a in ctx.backend.list_adapters()] if ctx.backend.ready else []
    if names:
        components["GenerateRequest"]["properties"]["adapter"]["examples"] = names
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            components[name]["properties"]["model"]["examples"] = names
    app.openapi_schema = schema
    return schema
