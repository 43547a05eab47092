"""Adapters: GET /v1/adapters (what a tenant may use), POST/DELETE /admin/adapters (admin tenants only).

Loading and unloading go through the engine, which swaps adapters between steps: requests in flight
finish on the weights they started with.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from matryoshka_lora.errors import UnknownAdapterError
from matryoshka_lora.server.context import admin_tenant, current_tenant, get_context
from matryoshka_lora.server.schemas import (
    AdapterList,
    AdapterView,
    ErrorResponse,
    LoadAdapterRequest,
    UnloadAdapterResponse,
)
from matryoshka_lora.server.tenants import Tenant
from matryoshka_lora.types import AdapterInfo

router = APIRouter(tags=["adapters"])


def _errors(*statuses: int) -> dict:
    text = {
        400: "Malformed JSON.",
        401: "Missing or invalid API key.",
        403: "Not an admin tenant.",
        404: "Unknown adapter.",
        413: "Request body too large.",
        422: "Invalid body or name, or the directory is not a valid adapter for this base model.",
        503: "Engine not ready.",
    }
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


def view_of(info: AdapterInfo, with_path: bool = False) -> AdapterView:
    """An adapter as the API shows it; `accuracy` is eval_results["accuracy"] (rank -> accuracy)."""
    results = info.eval_results or None
    accuracy = results.get("accuracy") if isinstance(results, dict) else None
    if isinstance(accuracy, dict):
        accuracy = {str(k): float(v) for k, v in accuracy.items() if isinstance(v, (int, float))}
    else:
        accuracy = None
    return AdapterView(
        name=info.name,
        r_max=info.r_max,
        train_ranks=list(info.train_ranks),
        method=info.method,
        scaling=info.scaling,
        base_model=info.base_model,
        target_modules=list(info.target_modules),
        accuracy=accuracy,
        eval_results=results,
        path=info.path if with_path else None,
    )


@router.get(
    "/v1/adapters",
    response_model=AdapterList,
    response_model_exclude_none=True,
    responses=_errors(401),
    summary="Adapters this tenant may use, with ranks and per-rank accuracy",
)
async def list_adapters(request: Request, tenant: Tenant = Depends(current_tenant)) -> AdapterList:
    ctx = get_context(request)
    return AdapterList(data=[view_of(a, with_path=tenant.admin) for a in ctx.visible_adapters(tenant)])


@router.post(
    "/admin/adapters",
    response_model=AdapterView,
    response_model_exclude_none=True,
    status_code=201,
    responses=_errors(400, 401, 403, 413, 422, 503),
    summary="Load (or replace) an adapter from a directory",
)
async def load_adapter(body: LoadAdapterRequest, request: Request, tenant: Tenant = Depends(admin_tenant)):
    ctx = get_context(request)
    ctx.check_ready()
    info = await ctx.backend.load_adapter(body.path, body.name)
    return view_of(info, with_path=True)


@router.delete(
    "/admin/adapters/{name}",
    response_model=UnloadAdapterResponse,
    responses=_errors(401, 403, 404, 422, 503),
    summary="Unload an adapter (running requests finish first)",
)
async def unload_adapter(name: str, request: Request, tenant: Tenant = Depends(admin_tenant)):
    ctx = get_context(request)
    ctx.check_ready()
    loaded = [a.name for a in ctx.backend.list_adapters()]
    if name not in loaded:
        raise UnknownAdapterError(name, loaded)
    await ctx.backend.unload_adapter(name)
    return UnloadAdapterResponse(name=name)
