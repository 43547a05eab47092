"""Per-tenant admission limits (rate: token bucket; concurrency: in-flight count) and request limits.

All of it runs on the server's event loop thread, so no locks are needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.server.errors import PayloadTooLargeError, RateLimitedError
from matryoshka_lora.server.tenants import Tenant


class TokenBucket:
    """`rate` tokens per second refill a bucket of `burst` tokens; each request takes one.

    tokens = min(burst, tokens + rate * (now - last))
    take: tokens >= 1 -> tokens -= 1, admitted; else wait (1 - tokens) / rate seconds
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.last = clock()

    def wait_s(self) -> float:
        """Refill to now; 0.0 when a token is there, else the seconds until one is (nothing taken)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + self.rate * (now - self.last))
        self.last = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def try_take(self) -> float:
        """Take a token: 0.0 when admitted, else the seconds until one is available."""
        wait_s = self.wait_s()
        if wait_s == 0.0:
            self.tokens -= 1.0
        return wait_s


class TenantLimiter:
    """Admission control per tenant: `admit(tenant)` checks concurrency then rate, and holds a slot
    until `release(tenant)`. RateLimitedError carries the limit and the retry delay. `refusal(tenant)`
    says whether `admit` would refuse now, taking nothing (the admission layer's early answer)."""

    CONCURRENCY_RETRY_S = 1.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self.num_in_flight: dict[str, int] = {}

    def _bucket(self, tenant: Tenant) -> TokenBucket:
        bucket = self._buckets.get(tenant.name)
        if bucket is None:
            bucket = self._buckets[tenant.name] = TokenBucket(tenant.rate_limit_rps, tenant.burst or 1, self.clock)
        return bucket

    def _check(self, tenant: Tenant, take: bool) -> None:
        if tenant.max_concurrency is not None and self.num_in_flight.get(tenant.name, 0) >= tenant.max_concurrency:
            raise RateLimitedError(
                f"tenant {tenant.name!r} concurrency", f"{tenant.max_concurrency} in flight", self.CONCURRENCY_RETRY_S
            )
        if tenant.rate_limit_rps is not None:
            bucket = self._bucket(tenant)
            wait_s = bucket.try_take() if take else bucket.wait_s()
            if wait_s > 0:
                raise RateLimitedError(
                    f"tenant {tenant.name!r} rate",
                    f"{tenant.rate_limit_rps:g} requests/s, burst {bucket.burst}",
                    wait_s,
                )

    def admit(self, tenant: Tenant) -> None:
        self._check(tenant, take=True)
        self.num_in_flight[tenant.name] = self.num_in_flight.get(tenant.name, 0) + 1

    def refusal(self, tenant: Tenant) -> RateLimitedError | None:
        """The error `admit(tenant)` would raise now, or None; nothing is taken."""
        try:
            self._check(tenant, take=False)
        except RateLimitedError as exc:
            return exc
        return None

    def release(self, tenant: Tenant) -> None:
        self.num_in_flight[tenant.name] = max(0, self.num_in_flight.get(tenant.name, 0) - 1)


@dataclass(frozen=True)
class RequestLimits:
    """Server-wide limits on one request."""

    max_prompt_tokens: int
    max_output_tokens: int

    def check_max_tokens(self, max_tokens: int) -> None:
        if max_tokens > self.max_output_tokens:
            raise ConfigError("max_tokens", max_tokens, f"1..{self.max_output_tokens} (this server's limit)")

    def check_prompt(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens == 0:
            raise ConfigError("prompt", "an empty prompt (0 tokens)", "at least 1 token")
        if num_prompt_tokens > self.max_prompt_tokens:
            raise PayloadTooLargeError(
                "prompt length in tokens", num_prompt_tokens, f"<= {self.max_prompt_tokens} (this server's limit)"
            )
