"""OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

`model` names what to serve: the base model's name, `ADAPTER` (its r_max, or a `latency_budget_ms`
body field), or `ADAPTER@RANK`. Streams end with `data: [DONE]`; with `stream_options.include_usage`
a last chunk with empty `choices` carries the usage, as OpenAI's does.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.server.context import ServerContext, current_tenant, get_context
from matryoshka_lora.server.dispatch import Flight, Job, complete, open_stream, sampling_of
from matryoshka_lora.server.errors import error_body
from matryoshka_lora.server.routes_generate import (
    GENERATION_ERRORS,
    raise_if_failed,
    timings_of,
)
from matryoshka_lora.server.schemas_openai import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    MatryoshkaInfo,
    ModelCard,
    ModelList,
    OpenAIRequest,
    Usage,
    parse_model,
)
from matryoshka_lora.server.sse import DONE_LINE, FlightStreamingResponse, sse_line
from matryoshka_lora.server.tenants import Tenant

router = APIRouter(prefix="/v1", tags=["openai"])
STREAM_DOC = {
    200: {
        "description": "With stream=true: `text/event-stream` of chunks, then `data: [DONE]`.",
        "content": {"text/event-stream": {}},
    }
}


def job_of(
    ctx: ServerContext, body: OpenAIRequest, prompt: str | None, messages: list[dict] | None, max_tokens: int
) -> Job:
    adapter, model_rank = parse_model(body.model, ctx.backend.model_name)
    rank = body.rank
    if model_rank is not None:
        if rank is not None and rank != model_rank:
            raise ConfigError("rank", {"model": body.model, "rank": rank}, "one rank: in `model` or in `rank`")
        if body.latency_budget_ms is not None:
            raise ConfigError(
                "rank",
                {"model": body.model, "latency_budget_ms": body.latency_budget_ms},
                "either ADAPTER@RANK or latency_budget_ms, not both",
            )
        if model_rank < 1:
            raise ConfigError("rank", model_rank, "an integer >= 1")
        rank = model_rank
    if adapter is None and (rank is not None or body.latency_budget_ms is not None):
        raise ConfigError("rank", rank or body.latency_budget_ms, "none for the base model (rank 0)")
    sampling = sampling_of(body, max_tokens)
    return Job(
        prompt=prompt,
        messages=messages,
        adapter=adapter,
        rank=rank,
        latency_budget_ms=body.latency_budget_ms,
        sampling=sampling,
    )


def info_of(flight: Flight, with_timings: bool = True) -> MatryoshkaInfo:
    return MatryoshkaInfo(
        adapter=flight.gen.adapter,
        rank=flight.first.rank,
        rank_reason=flight.first.rank_reason,
        timings=timings_of(flight.last) if with_timings else None,
    )


def usage_of(flight: Flight) -> Usage:
    last = flight.last
    return Usage(
        prompt_tokens=last.num_prompt_tokens,
        completion_tokens=last.num_output_tokens,
        total_tokens=last.num_prompt_tokens + last.num_output_tokens,
    )


async def _chunks(flight: Flight, chunk: Callable[..., object], include_usage: bool) -> AsyncIterator[str]:
    """SSE lines: `chunk(request_id, text, finish_reason, info, usage)` builds one chunk object."""

    def make(*args, **kwargs):
        return chunk(flight.gen.request_id, *args, **kwargs)

    yield sse_line(make(flight.first.text_delta or None, None, info_of(flight, with_timings=False), None), False)
    async for event in flight:
        if event.finished:
            break
        if event.text_delta:
            yield sse_line(make(event.text_delta, None, None, None), False)
    last = flight.last
    if last.finish_reason in ("error", "abort"):
        kind = "engine_error" if last.finish_reason == "error" else "aborted"
        yield sse_line(error_body(kind, last.error or f"the request ended: {last.finish_reason}"))
        yield DONE_LINE
        return
    final_text = last.text_delta if last is not flight.first else None  # the first one is already sent
    yield sse_line(make(final_text or None, last.finish_reason, info_of(flight), None), False)
    if include_usage:
        yield sse_line(make(None, None, None, usage_of(flight), no_choice=True), False)
    yield DONE_LINE


def _include_usage(body: OpenAIRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _serve(
    ctx: ServerContext,
    tenant: Tenant,
    request: Request,
    body: OpenAIRequest,
    job: Job,
    chunk: Callable[..., object],
    whole: Callable[[Flight, str], object],
):
    """Both OpenAI routes' tail: a stream of `chunk`s (then [DONE]), or `whole(flight, text)` once done."""
    if body.stream:
        flight = await open_stream(ctx, tenant, request, job)
        return FlightStreamingResponse(_chunks(flight, chunk, _include_usage(body)), flight)
    flight, text = await complete(ctx, tenant, request, job)
    raise_if_failed(flight)
    return whole(flight, text)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**GENERATION_ERRORS, **STREAM_DOC},
    summary="OpenAI-compatible text completion",
)
async def completions(body: CompletionRequest, request: Request, tenant: Tenant = Depends(current_tenant)):
    ctx = get_context(request)
    max_tokens = body.max_tokens or min(DEFAULT_COMPLETION_MAX_TOKENS, ctx.settings.max_output_tokens)
    job = job_of(ctx, body, body.prompt_text(), None, max_tokens)
    created = int(time.time())

    def chunk(request_id, text, finish_reason, info, usage, no_choice=False):
        choices = [] if no_choice else [CompletionChoice(text=text or "", finish_reason=finish_reason)]
        return CompletionResponse(
            id=request_id, created=created, model=body.model, choices=choices, usage=usage, matryoshka=info
        )

    def whole(flight, text):
        return chunk(flight.gen.request_id, text, flight.last.finish_reason, info_of(flight), usage_of(flight))

    return await _serve(ctx, tenant, request, body, job, chunk, whole)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**GENERATION_ERRORS, **STREAM_DOC},
    summary="OpenAI-compatible chat completion",
)
async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: Tenant = Depends(current_tenant)):
    ctx = get_context(request)
    for given in (body.max_tokens, body.max_completion_tokens):  # each within the limit, as the schema says
        if given is not None:
            ctx.limits.check_max_tokens(given)
    max_tokens = body.max_completion_tokens or body.max_tokens or ctx.settings.max_output_tokens
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    job = job_of(ctx, body, None, messages, max_tokens)
    created = int(time.time())

    def chunk(request_id, text, finish_reason, info, usage, no_choice=False):
        delta = (
            ChatDelta(role="assistant", content=text or "")
            if info is not None and finish_reason is None
            else ChatDelta(content=text)
        )
        choices = [] if no_choice else [ChatChunkChoice(delta=delta, finish_reason=finish_reason)]
        return ChatCompletionChunk(
            id=request_id, created=created, model=body.model, choices=choices, usage=usage, matryoshka=info
        )

    def whole(flight, text):
        return ChatCompletionResponse(
            id=flight.gen.request_id,
            created=created,
            model=body.model,
            choices=[ChatChoice(message=ChatMessageOut(content=text), finish_reason=flight.last.finish_reason)],
            usage=usage_of(flight),
            matryoshka=info_of(flight),
        )

    return await _serve(ctx, tenant, request, body, job, chunk, whole)


@router.get(
    "/models",
    response_model=ModelList,
    responses={401: GENERATION_ERRORS[401]},
    summary="The base model, each adapter, and each ADAPTER@RANK of its train ranks",
)
async def models(request: Request, tenant: Tenant = Depends(current_tenant)) -> ModelList:
    ctx = get_context(request)
    base = ctx.backend.model_name
    now = int(time.time())
    cards = [ModelCard(id=base, created=now, root=base)]
    for info in ctx.visible_adapters(tenant):
        cards.append(ModelCard(id=info.name, created=now, root=info.name, parent=base))
        ranks = [r for r in info.train_ranks if tenant.max_rank is None or r <= tenant.max_rank]
        cards += [ModelCard(id=f"{info.name}@{r}", created=now, root=info.name, parent=base) for r in ranks]
    return ModelList(data=cards)
