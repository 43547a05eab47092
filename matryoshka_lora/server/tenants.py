"""Tenants: who may call the server, with which adapters, at which ranks and rates.

A tenants file (TOML, or YAML by its .yaml/.yml suffix) holds one table per tenant:

    [tenants.acme]
    api_key_sha256 = "9f86d081..."   # sha256 hex of the API key: `matryoshka-lora serve --hash-key`
    adapters = ["support-bot"]       # or "*" for every loaded adapter
    max_rank = 16                    # optional: highest rank it may ask for (a budget never picks above)
    rate_limit_rps = 5.0             # optional: sustained requests per second (token bucket) ...
    burst = 10                       # ... and the bucket size (default: max(1, ceil(rate_limit_rps)))
    max_concurrency = 4              # optional: requests in flight at once
    admin = false                    # may load/unload adapters (POST/DELETE /admin/adapters)

Keys are only stored hashed. A client sends `Authorization: Bearer KEY`; the server hashes KEY and
looks the hash up. Without a tenants file the server is open: every caller is the admin tenant
"default" with no limits but the server-wide ones.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.server.errors import AuthenticationError

SHA256_HEX = r"^[0-9a-f]{64}$"


def hash_key(key: str) -> str:
    """The sha256 hex digest of an API key, as stored in the tenants file."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """One tenant. `adapters=None` means every adapter ("*")."""

    name: str
    key_sha256: str | None = None
    adapters: frozenset[str] | None = None
    max_rank: int | None = None
    rate_limit_rps: float | None = None
    burst: int | None = None
    max_concurrency: int | None = None
    admin: bool = False

    def may_use(self, adapter: str | None) -> bool:
        """The base model (None) is open to every tenant; an adapter needs "*" or its name listed."""
        return adapter is None or self.adapters is None or adapter in self.adapters


OPEN_TENANT = Tenant(name="default", admin=True)


class _TenantSpec(BaseModel):
    """One tenant table of the file, as written (validated strictly: unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    api_key_sha256: str = Field(pattern=SHA256_HEX)
    adapters: list[str] | Literal["*"] = "*"
    max_rank: int | None = Field(None, ge=1)
    rate_limit_rps: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    admin: bool = False


def _read(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"tenants file {path}", "unparsable YAML", str(exc)) from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"tenants file {path}", "unparsable TOML", str(exc)) from None
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), dict) or not data["tenants"]:
        raise ConfigError(f"tenants file {path}", type(data).__name__, "a non-empty `tenants` table of tenant tables")
    extra = sorted(set(data) - {"tenants"})
    if extra:
        raise ConfigError(f"tenants file {path}", extra, "only the `tenants` table at top level")
    return data["tenants"]


def load_tenants(path: str | Path) -> list[Tenant]:
    """Read and validate a tenants file; ConfigError names the tenant, the key and what is allowed."""
    path = Path(path)
    tenants, owners = [], {}
    for name, raw in _read(path).items():
        if not isinstance(raw, dict):
            raise ConfigError(f"tenant {name!r} in {path}", raw, "a table of tenant settings")
        try:
            spec = _TenantSpec(**raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"tenant {name!r} key {key!r} in {path}", err.get("input"), err["msg"]) from None
        if spec.api_key_sha256 in owners:
            raise ConfigError(
                f"tenant {name!r} in {path}",
                f"an API key hash already used by tenant {owners[spec.api_key_sha256]!r}",
                "one key per tenant",
            )
        owners[spec.api_key_sha256] = name
        burst = spec.burst
        if spec.rate_limit_rps is not None and burst is None:
            burst = max(1, math.ceil(spec.rate_limit_rps))
        tenants.append(
            Tenant(
                name=str(name),
                key_sha256=spec.api_key_sha256,
                adapters=None if spec.adapters == "*" else frozenset(spec.adapters),
                max_rank=spec.max_rank,
                rate_limit_rps=spec.rate_limit_rps,
                burst=burst,
                max_concurrency=spec.max_concurrency,
                admin=spec.admin,
            )
        )
    return tenants


class TenantRegistry:
    """Maps a bearer key to its tenant. `TenantRegistry(None)` is the open server (no keys)."""

    def __init__(self, tenants: list[Tenant] | None):
        self.is_open = tenants is None
        self._by_hash = {t.key_sha256: t for t in tenants or []}
        self.tenants = list(tenants or [OPEN_TENANT])

    def authenticate(self, authorization: str | None) -> Tenant:
        """`Authorization: Bearer KEY` -> its tenant; AuthenticationError when missing or unknown."""
        if self.is_open:
            return OPEN_TENANT
        if not authorization:
            raise AuthenticationError("missing API key: send the header `Authorization: Bearer <key>`")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("malformed Authorization header: expected `Bearer <key>`")
        tenant = self._by_hash.get(hash_key(key.strip()))
        if tenant is None:
            raise AuthenticationError("invalid API key")
        return tenant
