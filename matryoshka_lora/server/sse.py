"""Server-sent events for a request in flight.

`FlightStreamingResponse` closes the flight however the stream ends (done, client gone, server stop),
so the engine frees the request's slot at once and the tenant's concurrency slot is returned.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from matryoshka_lora.server.dispatch import Flight

DONE_LINE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_line(payload: Any, exclude_none: bool = True) -> str:
    """One SSE event: `data: <compact JSON>` and a blank line (pydantic models: None fields dropped
    unless `exclude_none=False`, as OpenAI chunks keep `finish_reason: null`)."""
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json", exclude_none=exclude_none)
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


class FlightStreamingResponse(StreamingResponse):
    def __init__(self, content: AsyncIterator[str], flight: Flight):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.flight = flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.flight.close()
