"""POST /generate: the native API (a rank or a latency budget per request; JSON or SSE)."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request

from matryoshka_lora.server.context import ServerContext, current_tenant, get_context
from matryoshka_lora.server.dispatch import Flight, Job, complete, open_stream, sampling_of
from matryoshka_lora.server.errors import EngineError, NotReadyError
from matryoshka_lora.server.schemas import (
    DEFAULT_GENERATE_MAX_TOKENS,
    ErrorDetail,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    StreamEvent,
    Timings,
)
from matryoshka_lora.server.sse import FlightStreamingResponse, sse_line
from matryoshka_lora.server.tenants import Tenant
from matryoshka_lora.types import GenerationEvent

router = APIRouter(tags=["generate"])

GENERATION_ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Malformed JSON.",
        401: "Missing or invalid API key.",
        403: "Adapter not allowed for this tenant, or rank above its max_rank.",
        404: "Unknown adapter or model.",
        413: "Request body or prompt too large.",
        422: "Invalid field (rank outside 1..r_max, both rank and latency_budget_ms, wrong type, ...).",
        429: "Tenant rate or concurrency limit (see Retry-After).",
        500: "The engine failed on this request.",
        503: "Engine queue full, engine not ready, or shutting down (see Retry-After).",
    }.items()
}


def timings_of(event: GenerationEvent) -> Timings:
    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000.0, 3)

    return Timings(
        queue_ms=ms(event.queue_s),
        ttft_ms=ms(event.ttft_s),
        total_ms=ms(event.total_s),
        predicted_latency_ms=ms(event.predicted_latency_s),
    )


def raise_if_failed(flight: Flight) -> None:
    """A non-streamed request the engine ended with an error (500) or aborted (503, shutting down)."""
    last = flight.last
    if last.finish_reason == "error":
        raise EngineError(f"the engine failed on this request: {last.error or 'unknown error'}")
    if last.finish_reason == "abort":
        raise NotReadyError("the request was aborted (the server is shutting down)")


def job_of(body: GenerateRequest, max_output_tokens: int) -> Job:
    messages = [{"role": m.role, "content": m.text()} for m in body.messages] if body.messages else None
    max_tokens = body.max_tokens if body.max_tokens is not None else min(DEFAULT_GENERATE_MAX_TOKENS, max_output_tokens)
    sampling = sampling_of(body, max_tokens)
    return Job(
        prompt=body.prompt,
        messages=messages,
        adapter=body.adapter,
        rank=body.rank,
        latency_budget_ms=body.latency_budget_ms,
        sampling=sampling,
    )


async def _stream(flight: Flight, adapter: str | None) -> AsyncIterator[str]:
    rid = flight.gen.request_id
    first = flight.first
    yield sse_line(StreamEvent(type="start", id=rid, adapter=adapter, rank=first.rank, rank_reason=first.rank_reason))
    last = first
    if first.text_delta:
        yield sse_line(StreamEvent(type="token", id=rid, text=first.text_delta))
    async for event in flight:
        last = event
        if event.text_delta:
            yield sse_line(StreamEvent(type="token", id=rid, text=event.text_delta))
    if last.finish_reason == "error":
        detail = ErrorDetail(type="engine_error", message=last.error or "the engine failed on this request")
        yield sse_line(StreamEvent(type="error", id=rid, error=detail))
        return
    yield sse_line(
        StreamEvent(
            type="done",
            id=rid,
            finish_reason=last.finish_reason,
            num_prompt_tokens=last.num_prompt_tokens,
            num_output_tokens=last.num_output_tokens,
            timings=timings_of(last),
        )
    )


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        **GENERATION_ERRORS,
        200: {
            "description": "The answer; with stream=true, `text/event-stream` of StreamEvent JSON lines.",
            "content": {"text/event-stream": {}},
        },
    },
    summary="Generate with an adapter at a rank (or a latency budget)",
)
async def generate(body: GenerateRequest, request: Request, tenant: Tenant = Depends(current_tenant)):
    ctx: ServerContext = get_context(request)
    job = job_of(body, ctx.settings.max_output_tokens)
    if body.stream:
        flight = await open_stream(ctx, tenant, request, job)
        return FlightStreamingResponse(_stream(flight, body.adapter), flight)
    flight, text = await complete(ctx, tenant, request, job)
    raise_if_failed(flight)
    last, first = flight.last, flight.first
    return GenerateResponse(
        id=flight.gen.request_id,
        model=ctx.backend.model_name,
        adapter=body.adapter,
        rank=first.rank,
        rank_reason=first.rank_reason,
        text=text,
        finish_reason=last.finish_reason,
        num_prompt_tokens=last.num_prompt_tokens,
        num_output_tokens=last.num_output_tokens,
        latency_budget_ms=body.latency_budget_ms,
        timings=timings_of(last),
    )
