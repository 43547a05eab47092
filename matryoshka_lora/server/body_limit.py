"""An ASGI middleware that refuses request bodies above `max_body_bytes` with 413, before any parsing.

declared Content-Length > max            -> 413 at once
otherwise read the body, counting bytes   -> 413 as soon as the count passes max
then hand the app the buffered body, and later ASGI messages (the disconnect) unchanged
"""

from __future__ import annotations

import json
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from matryoshka_lora.server.errors import error_body


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, on_reject: Callable[[Scope], None] | None = None):
        self.app, self.max_body_bytes, self.on_reject = app, max_body_bytes, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._reject(scope, send, int(declared))
            return
        chunks, size, more = [], 0, True
        disconnect: Message | None = None
        while more:
            message = await receive()
            if message["type"] != "http.request":
                disconnect = message
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject(scope, send, size)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            if disconnect is not None:
                return disconnect
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send, size: int) -> None:
        if self.on_reject is not None:
            self.on_reject(scope)
        payload = error_body(
            "payload_too_large", f"request body too large: {size} bytes", size, f"<= {self.max_body_bytes} bytes"
        )
        data = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})
