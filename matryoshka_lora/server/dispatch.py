"""From a parsed request to engine events: validate against tenant and limits, enqueue, await.

    job = Job(...)                               # what a route parsed, route-independent
    flight = await admit(ctx, tenant, job, req)  # checks, tenant slot, engine.generate, first event
    async for event in flight: ...               # the rest of the events
    await flight.close()                         # always: aborts if unfinished, frees the slot, metrics

`race_disconnect(work, request)` runs a coroutine until it ends or the client goes away; then it cancels
the work (which closes the engine iterator, so the engine frees the request's slot at once).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable

from fastapi import Request

from matryoshka_lora.errors import BudgetUnmetError, UnknownAdapterError
from matryoshka_lora.server.context import ServerContext
from matryoshka_lora.server.errors import ClientGoneError, PermissionDeniedError
from matryoshka_lora.server.prometheus import BASE_ADAPTER, NO_RANK
from matryoshka_lora.server.tenants import Tenant
from matryoshka_lora.types import GenerationEvent, GenerationRequest, SamplingParams

log = logging.getLogger(__name__)
STATUS_CLIENT_GONE = 499


@dataclass(frozen=True)
class Job:
    """One generation request as parsed by a route: exactly one of prompt / messages."""

    prompt: str | None
    messages: list[dict] | None
    adapter: str | None
    rank: int | None
    latency_budget_ms: float | None
    sampling: SamplingParams


def sampling_of(body, max_tokens: int) -> SamplingParams:
    """The sampling settings of a validated /generate or OpenAI body (both carry these fields)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_tuple(),
        ignore_eos=body.ignore_eos,
    )


def new_request_id(prefix: str = "gen") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Flight:
    """One admitted request, from its first engine event to `close()`."""

    def __init__(
        self, ctx: ServerContext, tenant: Tenant, request: Request, gen: GenerationRequest, adapter_label: str
    ):
        self.ctx, self.tenant, self.request, self.gen = ctx, tenant, request, gen
        self.adapter_label = adapter_label
        self.first: GenerationEvent | None = None
        self.last: GenerationEvent | None = None
        self._events: AsyncIterator[GenerationEvent] | None = None
        self._closed = self._released = False

    async def start(self) -> GenerationEvent:
        """Enqueue and wait for the first event (rank decided). Engine errors raise from here."""
        self._events = self.ctx.backend.generate(self.gen)
        self.first = await anext(self._events)
        self.last = self.first
        if self.first.finished:
            self._release_slot()
        return self.first

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        """The events after the first one, up to the finished one."""
        if self.last is not None and self.last.finished:
            return
        async for event in self._events:
            self.last = event
            if event.finished:  # before the client hears of it: its next request finds the slot free
                self._release_slot()
            yield event
            if event.finished:
                return

    def _release_slot(self) -> None:
        if not self._released:
            self._released = True
            self.ctx.limiter.release(self.tenant)

    @property
    def status(self) -> int:
        """The answer's status as counted in metrics: 499 if unfinished, 500 on engine error, 503 on abort."""
        if self.last is None or not self.last.finished:
            return STATUS_CLIENT_GONE
        return {"error": 500, "abort": 503}.get(self.last.finish_reason, 200)

    async def close(self, count: bool = True) -> None:
        """Idempotent: close the engine iterator (aborting an unfinished request), free the tenant slot (if
        the finished event has not already), and record the request in metrics (`count=False` when an
        exception handler will)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._events is not None and hasattr(self._events, "aclose"):
                await self._events.aclose()
        finally:
            self._release_slot()
            if count:
                self._record()

    def _record(self) -> None:
        self.request.state.counted = True
        rank = str(self.first.rank) if self.first is not None else NO_RANK
        self.ctx.metrics.count_request(self.adapter_label, rank, self.status)
        if self.status == 200:
            self.ctx.metrics.observe_finished(self.adapter_label, self.last, self.gen.latency_budget_ms)


def _check_adapter(ctx: ServerContext, tenant: Tenant, request: Request, job: Job) -> None:
    """403 for an adapter the tenant may not use (the same answer whether it exists or not), 404 for one
    not loaded, 403 for a rank above the tenant's max_rank."""
    if not tenant.may_use(job.adapter):
        allowed = sorted(tenant.adapters or ())
        raise PermissionDeniedError(f"adapter for tenant {tenant.name!r}", job.adapter, allowed)
    if job.adapter is None:
        request.state.metric_adapter = BASE_ADAPTER
        return
    visible = {a.name: a for a in ctx.visible_adapters(tenant)}
    info = visible.get(job.adapter)
    if info is None:
        raise UnknownAdapterError(job.adapter, sorted(visible))
    request.state.metric_adapter = job.adapter
    cap = tenant.max_rank
    if job.rank is not None and cap is not None and job.rank > cap:
        raise PermissionDeniedError(f"rank for tenant {tenant.name!r}", job.rank, f"1..{min(cap, info.r_max)}")


def _engine_request(tenant: Tenant, job: Job, prompt_ids: list[int], refuse_unmet_budget: bool) -> GenerationRequest:
    """The engine caps both a budget's pick and the default rank (r_max) at `max_rank`."""
    return GenerationRequest(
        request_id=new_request_id(),
        prompt_token_ids=tuple(prompt_ids),
        sampling=job.sampling,
        adapter=job.adapter,
        rank=job.rank,
        latency_budget_ms=job.latency_budget_ms,
        max_rank=tenant.max_rank,
        tenant=tenant.name,
        refuse_unmet_budget=refuse_unmet_budget,
    )


async def admit(ctx: ServerContext, tenant: Tenant, request: Request, job: Job) -> Flight:
    """Validate `job` for `tenant`, take a tenant slot, enqueue, and return once the first event is in.

    Raises (mapped to HTTP by server/errors.py): NotReadyError, PermissionDeniedError,
    UnknownAdapterError, ConfigError (limits), PayloadTooLargeError, RateLimitedError, and what the
    engine raises at enqueue (InvalidRankError, QueueFullError, BudgetUnmetError).
    """
    ctx.check_ready()
    _check_adapter(ctx, tenant, request, job)
    ctx.limits.check_max_tokens(job.sampling.max_tokens)
    ctx.limiter.admit(tenant)  # before the prompt is tokenized: a flood past its limits costs little
    try:
        prompt_ids = ctx.backend.encode_prompt(job.prompt, job.messages)
        ctx.limits.check_prompt(len(prompt_ids))
    except BaseException:
        ctx.limiter.release(tenant)
        raise
    gen = _engine_request(tenant, job, prompt_ids, ctx.settings.budget_unmet == "refuse")
    flight = Flight(ctx, tenant, request, gen, request.state.metric_adapter)
    try:
        await flight.start()
    except UnknownAdapterError as exc:  # unloaded in between: answer with what this tenant may see
        await flight.close(count=False)
        raise UnknownAdapterError(exc.given, sorted(a.name for a in ctx.visible_adapters(tenant))) from None
    except BudgetUnmetError:
        await flight.close(count=False)
        ctx.metrics.count_budget_refused(request.state.metric_adapter)
        raise
    except Exception:
        await flight.close(count=False)
        raise
    except BaseException:  # cancelled: the client went away while queued
        await flight.close()
        raise
    return flight


async def wait_disconnect(request: Request) -> None:
    """Return when the client disconnects (the body is already read: the next ASGI message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(work: Awaitable[Any], request: Request) -> Any:
    """Run `work` until it ends, or cancel it when the client disconnects first (ClientGoneError)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:  # it failed while being cancelled: the client is gone anyway
        log.debug("request failed after the client left", exc_info=True)
    log.info("client went away; request cancelled")
    raise ClientGoneError("the client disconnected")


async def complete(ctx: ServerContext, tenant: Tenant, request: Request, job: Job) -> tuple[Flight, str]:
    """Non-streaming: admit and collect the whole text; cancelled at once if the client disconnects."""

    async def work() -> tuple[Flight, str]:
        flight = await admit(ctx, tenant, request, job)
        try:
            parts = [flight.first.text_delta]
            async for event in flight:
                parts.append(event.text_delta)
        finally:
            await flight.close()
        return flight, "".join(parts)

    return await race_disconnect(work(), request)


async def open_stream(ctx: ServerContext, tenant: Tenant, request: Request, job: Job) -> Flight:
    """Streaming: admit (cancelled if the client leaves while queued); the caller streams the rest."""
    return await race_disconnect(admit(ctx, tenant, request, job), request)
