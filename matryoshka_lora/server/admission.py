"""An ASGI layer that answers a flood's refusals before FastAPI does any work for them.

For a POST to a generation path (/generate, /v1/completions, /v1/chat/completions):

    tenant = authenticate(Authorization header)        -> 401 here when missing or unknown
    if the engine is ready and limiter.refusal(tenant):  # over its rate or concurrency limit; takes nothing
        adapter = the body's `adapter` (or the adapter its `model` names)
        if adapter is the base model, or a loaded one the tenant may use:
            -> 429 here (with Retry-After), counted under that adapter
    everything else -> the app, with the body replayed unchanged

The app checks the same again, so a request let through here can still be refused there (a token taken
in between). Why: through FastAPI (routing, dependency solving, body validation, the exception handler)
a refusal took ~3 ms of the event loop's CPU, CPU a 2-core host takes from the model's decode steps;
here it costs a header lookup, a `json.loads` and one small response.

What a client sees differently: a tenant over its limit gets its 429 before the body's other fields are
validated (a 422 it would get comes once it is under its limit again). A foreign or unknown adapter still
gets its 403 / 404 first, and every answer has the same body as the app's.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from matryoshka_lora.server.context import GENERATION_PATHS, ServerContext
from matryoshka_lora.server.errors import AuthenticationError, NotReadyError, map_exception
from matryoshka_lora.server.prometheus import BASE_ADAPTER, NO_RANK, UNKNOWN_ADAPTER
from matryoshka_lora.server.schemas_openai import parse_model
from matryoshka_lora.server.tenants import Tenant


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


async def _read_body(receive: Receive) -> tuple[bytes | None, Receive]:
    """The whole body (None when it comes in more than one message) and a `receive` that replays it."""
    first: Message | None = await receive()
    body = None
    if first["type"] == "http.request" and not first.get("more_body", False):
        body = first.get("body", b"")

    async def replay() -> Message:
        nonlocal first
        if first is not None:
            message, first = first, None
            return message
        return await receive()

    return body, replay


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, ctx: ServerContext):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            tenant = self.ctx.tenants.authenticate(_header(scope, b"authorization"))
        except AuthenticationError as exc:
            await self._answer(exc, UNKNOWN_ADAPTER, scope, receive, send)
            return
        refusal = self.ctx.limiter.refusal(tenant) if self._ready() else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        body, receive = await _read_body(receive)
        label = self._adapter_label(scope["path"], body, tenant)
        if label is None:  # the app answers what it would: 400, 403, 404, 422, or the same 429
            await self.app(scope, receive, send)
            return
        await self._answer(refusal, label, scope, receive, send)

    def _ready(self) -> bool:
        try:
            self.ctx.check_ready()
        except NotReadyError:
            return False
        return True

    def _adapter_label(self, path: str, body: bytes | None, tenant: Tenant) -> str | None:
        """The metrics label of the adapter the body asks for, when it is the base model or a loaded
        adapter this tenant may use; None for anything else (unparsable, foreign, unknown)."""
        try:
            fields = json.loads(body) if body is not None else None
        except ValueError:
            return None
        if not isinstance(fields, dict):
            return None
        if path == "/generate":
            adapter = fields.get("adapter")
        else:
            model = fields.get("model")
            if not isinstance(model, str):
                return None
            adapter, _ = parse_model(model, self.ctx.backend.model_name)
        if adapter is None:
            return BASE_ADAPTER
        visible = any(info.name == adapter for info in self.ctx.visible_adapters(tenant))
        return adapter if visible else None

    async def _answer(self, exc: Exception, label: str, scope: Scope, receive: Receive, send: Send) -> None:
        response = map_exception(exc)
        self.ctx.metrics.count_request(label, NO_RANK, response.status_code)
        await response(scope, receive, send)
