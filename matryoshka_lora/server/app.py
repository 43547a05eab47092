"""The app factory and its lifespan.

    app = create_app(settings)            # or create_app(settings, backend=my_backend)
    uvicorn.run(app, ...)

Startup begins the engine's start (model load, warm-up) in the background, so /health answers at once
and /ready turns 200 when the engine is ready. Shutdown (uvicorn on SIGTERM: stop accepting, wait for
in-flight requests) ends with `engine.shutdown(drain_timeout_s)`. All state lives in `app.state.ctx`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
from typing import AsyncIterator

from fastapi import FastAPI

from matryoshka_lora import __version__
from matryoshka_lora.backends.base import EngineBackend
from matryoshka_lora.errors import ConfigError, MatryoshkaError
from matryoshka_lora.server import (
    routes_admin,
    routes_generate,
    routes_health,
    routes_openai,
)
from matryoshka_lora.server.admission import AdmissionMiddleware
from matryoshka_lora.server.body_limit import BodyLimitMiddleware
from matryoshka_lora.server.context import GENERATION_PATHS, ServerContext
from matryoshka_lora.server.errors import install_exception_handlers
from matryoshka_lora.server.limits import RequestLimits
from matryoshka_lora.server.openapi import server_openapi
from matryoshka_lora.server.prometheus import NO_RANK, UNKNOWN_ADAPTER, ServerMetrics
from matryoshka_lora.server.settings import ServerSettings
from matryoshka_lora.server.tenants import TenantRegistry, load_tenants

log = logging.getLogger(__name__)


def _vllm_usable() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def build_backend(settings: ServerSettings) -> EngineBackend:
    """The engine named by `settings.backend`: native; vllm (ConfigError when vLLM is not importable);
    auto = vllm where it is importable and a CUDA GPU is present, else native."""
    kind = settings.backend
    if kind == "auto":
        kind = "vllm" if _vllm_usable() else "native"
        log.info("backend auto -> %s", kind)
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "backend", "vllm", "native (vLLM is not importable here: install the `gpu` extra on a CUDA node)"
            )
        from matryoshka_lora.backends.vllm_backend import VLLMBackend

        return VLLMBackend.from_settings(settings)
    from matryoshka_lora.backends.native import NativeBackend
    from matryoshka_lora.engine.config import EngineConfig

    config = EngineConfig(
        model=settings.model,
        adapters=[str(p) for p in settings.adapters],
        max_num_seqs=settings.max_num_seqs,
        max_model_len=settings.max_model_len,
        max_queue_len=settings.max_queue_len,
        num_threads=settings.num_threads,
        fused_kernels=settings.fused_kernels,
        weight_format=settings.weight_format,
        adapter_dtype=settings.adapter_dtype,
        kv_cache_dtype=settings.kv_cache_dtype,
        seed=settings.seed,
        budget_layers_off=tuple(settings.budget_layers_off),
    )
    return NativeBackend(config)


async def _start_engine(app: FastAPI) -> None:
    ctx: ServerContext = app.state.ctx
    try:
        await ctx.backend.start()
        log.info(
            "engine ready: model %s, adapters %s", ctx.backend.model_name, [a.name for a in ctx.backend.list_adapters()]
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        ctx.start_error = exc
        log.error("the engine failed to start: %s", exc, exc_info=not isinstance(exc, MatryoshkaError))
        if app.state.exit_on_start_failure:
            signal.raise_signal(signal.SIGTERM)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: ServerContext = app.state.ctx
    if ctx.tenants.is_open:
        log.warning(
            "no tenants file: the server is OPEN (no API keys, every caller is admin) on %s:%s",
            ctx.settings.host,
            ctx.settings.port,
        )
    starting = asyncio.create_task(_start_engine(app))
    try:
        yield
    finally:
        ctx.draining = True
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        log.info("draining: waiting up to %.0f s for requests in flight", ctx.settings.drain_timeout_s)
        try:
            await ctx.backend.shutdown(ctx.settings.drain_timeout_s)
        except Exception:
            log.exception("engine shutdown failed")
        log.info("engine stopped")


def create_app(
    settings: ServerSettings | None = None, backend: EngineBackend | None = None, exit_on_start_failure: bool = False
) -> FastAPI:
    """Build the app: `backend` defaults to the one `settings` name; the app owns its lifecycle
    (start in the lifespan, shutdown at exit). `exit_on_start_failure` sends SIGTERM to this process when
    the engine fails to start (for `matryoshka-lora serve`)."""
    settings = settings or ServerSettings()
    tenants = TenantRegistry(load_tenants(settings.tenants) if settings.tenants else None)
    backend = backend if backend is not None else build_backend(settings)
    app = FastAPI(
        title="matryoshka-lora",
        version=__version__,
        lifespan=lifespan,
        summary="Nested-rank LoRA serving: one adapter, every rank, chosen per request.",
    )
    ctx = ServerContext(
        settings=settings,
        backend=backend,
        tenants=tenants,
        metrics=ServerMetrics(lambda: backend),
        limits=RequestLimits(settings.max_prompt_tokens, settings.max_output_tokens),
    )
    app.state.ctx = ctx
    app.state.exit_on_start_failure = exit_on_start_failure
    install_exception_handlers(app, ctx.record_error)

    def on_body_rejected(scope) -> None:
        if scope.get("path") in GENERATION_PATHS:
            ctx.metrics.count_request(UNKNOWN_ADAPTER, NO_RANK, 413)

    app.add_middleware(AdmissionMiddleware, ctx=ctx)  # inside the body limit: it sees the whole body
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, on_reject=on_body_rejected)
    for module in (routes_generate, routes_openai, routes_admin, routes_health):
        app.include_router(module.router)
    app.openapi = lambda: server_openapi(app, ctx)
    return app
