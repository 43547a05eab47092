"""Operations: GET /health (alive), GET /ready (engine ready: 200, else 503), GET /metrics (Prometheus).

None of them needs an API key: probes and scrapers call them.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from matryoshka_lora.server.context import get_context
from matryoshka_lora.server.errors import error_response
from matryoshka_lora.server.prometheus import CONTENT_TYPE
from matryoshka_lora.server.schemas import ErrorResponse, HealthResponse

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    responses={503: {"model": ErrorResponse, "description": "The engine failed to start."}},
    summary="Liveness",
)
async def health(request: Request):
    ctx = get_context(request)
    if ctx.start_error is not None:
        return error_response(503, "engine_failed", f"the engine failed to start: {ctx.start_error}")
    return HealthResponse(status="ok")


@router.get(
    "/ready",
    response_model=HealthResponse,
    responses={503: {"model": ErrorResponse, "description": "Starting, failed, or shutting down."}},
    summary="Readiness: 200 once the engine is ready",
)
async def ready(request: Request):
    ctx = get_context(request)
    if ctx.draining:
        return error_response(503, "not_ready", "the server is shutting down", retry_after_s=5)
    if ctx.start_error is not None:
        return error_response(503, "not_ready", f"the engine failed to start: {ctx.start_error}")
    if not ctx.backend.ready:
        return error_response(503, "not_ready", "the engine is still starting", retry_after_s=5)
    return HealthResponse(status="ready", model=ctx.backend.model_name)


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
async def metrics(request: Request) -> Response:
    return Response(get_context(request).metrics.render(), media_type=CONTENT_TYPE)
