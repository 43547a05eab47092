"""ServerContext: everything a handler needs, built once per app and kept in `app.state.ctx`."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request, Security
from fastapi.security import HTTPBearer

from matryoshka_lora.backends.base import EngineBackend
from matryoshka_lora.server.errors import NotReadyError, PermissionDeniedError
from matryoshka_lora.server.limits import RequestLimits, TenantLimiter
from matryoshka_lora.server.prometheus import NO_RANK, UNKNOWN_ADAPTER, ServerMetrics
from matryoshka_lora.server.settings import ServerSettings
from matryoshka_lora.server.tenants import Tenant, TenantRegistry
from matryoshka_lora.types import AdapterInfo

GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})


@dataclass
class ServerContext:
    settings: ServerSettings
    backend: EngineBackend
    tenants: TenantRegistry
    metrics: ServerMetrics
    limits: RequestLimits
    limiter: TenantLimiter = field(default_factory=TenantLimiter)
    draining: bool = False
    start_error: BaseException | None = None

    def check_ready(self) -> None:
        if self.draining:
            raise NotReadyError("the server is shutting down")
        if self.start_error is not None:
            raise NotReadyError(f"the engine failed to start: {self.start_error}")
        if not self.backend.ready:
            raise NotReadyError("the engine is still starting")

    def visible_adapters(self, tenant: Tenant) -> list[AdapterInfo]:
        """The loaded adapters this tenant may use (the others are not revealed to it)."""
        return [a for a in self.backend.list_adapters() if tenant.may_use(a.name)]

    def record_error(self, request: Request, status: int) -> None:
        """Count an error answer of a generation route once (labels as far as the request got)."""
        if request.url.path not in GENERATION_PATHS or getattr(request.state, "counted", False):
            return
        request.state.counted = True
        self.metrics.count_request(getattr(request.state, "metric_adapter", UNKNOWN_ADAPTER), NO_RANK, status)


def get_context(request: Request) -> ServerContext:
    return request.app.state.ctx


_bearer = HTTPBearer(auto_error=False, description="An API key from the tenants file (none on an open server).")


# The dependencies are coroutines: FastAPI would run a plain `def` dependency on its thread pool, a
# thread hand-off per request for microseconds of work (a key's hash and a dict lookup).
async def current_tenant(request: Request, _credentials=Security(_bearer)) -> Tenant:
    """The caller's tenant from `Authorization: Bearer KEY` (AuthenticationError -> 401)."""
    tenant = get_context(request).tenants.authenticate(request.headers.get("authorization"))
    request.state.tenant = tenant
    return tenant


async def admin_tenant(request: Request, _credentials=Security(_bearer)) -> Tenant:
    """Like current_tenant, and the tenant must be an admin (PermissionDeniedError -> 403)."""
    tenant = await current_tenant(request)
    if not tenant.admin:
        raise PermissionDeniedError("tenant for an admin route", tenant.name, "a tenant with admin = true")
    return tenant
