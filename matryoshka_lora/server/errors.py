"""The one place that maps exceptions to HTTP answers.

Every error answer has the body `{"error": {"type", "message", "given"?, "allowed"?}}`.

| exception                          | status | type                |
|------------------------------------|--------|---------------------|
| AuthenticationError                | 401    | authentication_error|
| PermissionDeniedError              | 403    | permission_denied   |
| UnknownAdapterError                | 404    | adapter_not_found   |
| PayloadTooLargeError               | 413    | payload_too_large   |
| InvalidRankError                   | 422    | invalid_rank        |
| AdapterFormatError                 | 422    | invalid_adapter     |
| ConfigError (other bad values)     | 422    | invalid_request     |
| RequestValidationError             | 422    | validation_error (400 invalid_json for malformed JSON) |
| RateLimitedError                   | 429    | rate_limited (+ Retry-After) |
| QueueFullError                     | 503    | queue_full (+ Retry-After)   |
| BudgetUnmetError (--budget-unmet refuse) | 503 | budget_unmet (+ Retry-After) |
| NotReadyError, EngineStoppedError  | 503    | not_ready (+ Retry-After)    |
| EngineError                        | 500    | engine_error        |
| ClientGoneError                    | 499    | client_closed_request (nobody reads it) |
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from matryoshka_lora.errors import (
    AdapterFormatError,
    BudgetUnmetError,
    ConfigError,
    EngineStoppedError,
    InvalidRankError,
    MatryoshkaError,
    QueueFullError,
    UnknownAdapterError,
)

log = logging.getLogger(__name__)


class AuthenticationError(MatryoshkaError):
    """No API key, or one that matches no tenant."""


class PermissionDeniedError(ConfigError):
    """The tenant may not do this (a foreign adapter, a rank above its max_rank, an admin route)."""

    def __init__(self, what: str, given: Any, allowed: Any):
        super().__init__(what, given, allowed)
        self.args = (f"{what}: {given!r} is not allowed; allowed: {allowed}",)


class PayloadTooLargeError(ConfigError):
    """A request body or prompt above the server's limit."""


class RateLimitedError(MatryoshkaError):
    """The tenant is over its request rate or concurrency; retry after `retry_after_s`."""

    def __init__(self, what: str, limit: Any, retry_after_s: float):
        self.what, self.limit, self.retry_after_s = what, limit, retry_after_s
        super().__init__(f"{what} limit reached ({limit}); retry after {retry_after_s:.2f} s")


class NotReadyError(MatryoshkaError):
    """The engine is still starting, or the server is draining for shutdown."""

    retry_after_s = 5.0


class EngineError(MatryoshkaError):
    """The engine ended a request with an error."""


class ClientGoneError(MatryoshkaError):
    """The client disconnected before its answer was ready."""


MAX_ECHO_CHARS = 200  # an error echoes at most this much of the offending value


def _jsonable(value: Any) -> Any:
    """`value` as strict JSON (non-finite floats as text), for echoing in an error."""
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


def _echo(value: Any) -> Any:
    """A short JSON echo of a client's value: long ones are cut to MAX_ECHO_CHARS characters."""
    value = _jsonable(value)
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) <= MAX_ECHO_CHARS:
        return value
    return text[:MAX_ECHO_CHARS] + f"... ({len(text)} characters)"


def error_body(kind: str, message: str, given: Any = None, allowed: Any = None) -> dict:
    """The JSON body of every error answer."""
    error: dict[str, Any] = {"type": kind, "message": message}
    if given is not None:
        error["given"] = _echo(given)
    if allowed is not None:
        error["allowed"] = _echo(allowed)
    return {"error": error}


def error_response(
    status: int,
    kind: str,
    message: str,
    given: Any = None,
    allowed: Any = None,
    retry_after_s: float | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return JSONResponse(error_body(kind, message, given, allowed), status_code=status, headers=headers)


def map_exception(exc: Exception) -> JSONResponse:
    """Translate one exception into its HTTP answer (see the module table)."""
    if isinstance(exc, AuthenticationError):
        return error_response(401, "authentication_error", str(exc), headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, PermissionDeniedError):
        return error_response(403, "permission_denied", str(exc), exc.given, exc.allowed)
    if isinstance(exc, UnknownAdapterError):
        return error_response(404, "adapter_not_found", str(exc), exc.given, exc.allowed)
    if isinstance(exc, PayloadTooLargeError):
        return error_response(413, "payload_too_large", str(exc), exc.given, exc.allowed)
    if isinstance(exc, InvalidRankError):
        return error_response(422, "invalid_rank", str(exc), exc.given, exc.allowed)
    if isinstance(exc, ConfigError):
        return error_response(422, "invalid_request", str(exc), exc.given, exc.allowed)
    if isinstance(exc, AdapterFormatError):
        return error_response(422, "invalid_adapter", str(exc))
    if isinstance(exc, RateLimitedError):
        return error_response(429, "rate_limited", str(exc), allowed=exc.limit, retry_after_s=exc.retry_after_s)
    if isinstance(exc, EngineStoppedError):
        return error_response(503, "not_ready", str(exc), retry_after_s=NotReadyError.retry_after_s)
    if isinstance(exc, QueueFullError):
        return error_response(
            503, "queue_full", str(exc), allowed=f"<= {exc.limit} requests waiting", retry_after_s=1.0
        )
    if isinstance(exc, BudgetUnmetError):
        return error_response(
            503,
            "budget_unmet",
            str(exc),
            given=f"{exc.budget_ms:g} ms",
            allowed=f"a budget this load can meet (rank {exc.rank}: ~{exc.predicted_ms:.0f} ms)",
            retry_after_s=exc.retry_after_s,
        )
    if isinstance(exc, NotReadyError):
        return error_response(503, "not_ready", str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, ClientGoneError):
        return error_response(499, "client_closed_request", str(exc))
    if isinstance(exc, EngineError):
        return error_response(500, "engine_error", str(exc))
    log.exception("unexpected error", exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


def _constraint(ctx: dict | None) -> str | None:
    """Pydantic's error context as a short 'allowed' text, e.g. {'ge': 1} -> '>= 1'."""
    if not ctx:
        return None
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "length >=", "max_length": "length <="}
    parts = [
        f"{symbols[k]} {v:g}" if isinstance(v, float) else f"{symbols[k]} {v}" for k, v in ctx.items() if k in symbols
    ]
    if "expected" in ctx:
        parts.append(str(ctx["expected"]))
    return ", ".join(parts) or None


def validation_response(exc: RequestValidationError) -> JSONResponse:
    """A pydantic/FastAPI validation failure: 400 for malformed JSON, else 422 naming the first bad field."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        return error_response(400, "invalid_json", f"request body is not valid JSON: {detail}", allowed="a JSON object")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    given = first.get("input") if loc else None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return error_response(422, "validation_error", f"{field}: {message}{more}", given, _constraint(first.get("ctx")))


def install_exception_handlers(app: FastAPI, on_error) -> None:
    """Register the handlers; `on_error(request, status)` records each error answer (metrics)."""

    async def matryoshka_handler(request: Request, exc: Exception) -> JSONResponse:
        response = map_exception(exc)
        on_error(request, response.status_code)
        return response

    async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
        response = validation_response(exc)
        on_error(request, response.status_code)
        return response

    async def http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        response = error_response(
            exc.status_code,
            kinds.get(exc.status_code, "http_error"),
            str(exc.detail),
            headers=getattr(exc, "headers", None),
        )
        on_error(request, response.status_code)
        return response

    async def unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
        response = map_exception(exc)
        on_error(request, response.status_code)
        return response

    app.add_exception_handler(MatryoshkaError, matryoshka_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_handler)
    app.add_exception_handler(Exception, unexpected_handler)
