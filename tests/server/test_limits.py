"""Token bucket, per-tenant admission, request limits."""

from __future__ import annotations

import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.server.errors import PayloadTooLargeError, RateLimitedError
from matryoshka_lora.server.limits import RequestLimits, TenantLimiter, TokenBucket
from matryoshka_lora.server.tenants import Tenant


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize(
    "rate,burst,steps,expected",
    [
        # steps: (advance seconds, expected wait from try_take)
        (1.0, 2, [(0, 0.0), (0, 0.0), (0, 1.0), (0.5, 0.5), (0.5, 0.0), (0, 1.0)], None),
        (10.0, 1, [(0, 0.0), (0, 0.1), (0.05, 0.05), (0.05, 0.0)], None),
        (2.0, 3, [(0, 0.0), (0, 0.0), (0, 0.0), (0, 0.5), (10, 0.0), (0, 0.0), (0, 0.0), (0, 0.5)], None),
    ],
)
def test_token_bucket(rate, burst, steps, expected):
    clock = Clock()
    bucket = TokenBucket(rate, burst, clock)
    for advance, wait in steps:
        clock.now += advance
        assert bucket.try_take() == pytest.approx(wait)


def test_limiter_rate_then_concurrency():
    clock = Clock()
    limiter = TenantLimiter(clock)
    rated = Tenant("rated", rate_limit_rps=1.0, burst=1)
    capped = Tenant("capped", max_concurrency=2)
    limiter.admit(rated)
    with pytest.raises(RateLimitedError) as err:
        limiter.admit(rated)
    assert err.value.retry_after_s == pytest.approx(1.0) and "1 requests/s" in str(err.value)
    limiter.admit(capped)
    limiter.admit(capped)
    with pytest.raises(RateLimitedError, match="concurrency"):
        limiter.admit(capped)
    limiter.release(capped)
    limiter.admit(capped)  # a slot came back
    assert limiter.num_in_flight == {"rated": 1, "capped": 2}


def test_concurrency_refusal_does_not_spend_a_rate_token():
    clock = Clock()
    limiter = TenantLimiter(clock)
    tenant = Tenant("t", rate_limit_rps=1.0, burst=1, max_concurrency=1)
    limiter.admit(tenant)
    clock.now += 1.0  # one token refilled
    with pytest.raises(RateLimitedError, match="concurrency"):
        limiter.admit(tenant)
    limiter.release(tenant)
    limiter.admit(tenant)  # the refilled token is still there


@pytest.mark.parametrize(
    "num_prompt,max_tokens,error",
    [
        (10, 5, None),
        (100, 50, None),
        (101, 5, PayloadTooLargeError),
        (0, 5, ConfigError),
        (10, 51, ConfigError),
    ],
)
def test_request_limits(num_prompt, max_tokens, error):
    limits = RequestLimits(max_prompt_tokens=100, max_output_tokens=50)
    if error is None:
        limits.check_prompt(num_prompt)
        limits.check_max_tokens(max_tokens)
    else:
        with pytest.raises(error):
            limits.check_prompt(num_prompt)
            limits.check_max_tokens(max_tokens)


def test_refusal_takes_nothing():
    """`refusal` says what `admit` would raise, and leaves the bucket and the slots as they were."""
    clock = Clock()
    limiter = TenantLimiter(clock)
    tenant = Tenant(name="t", rate_limit_rps=1.0, burst=1, max_concurrency=2)
    for _ in range(3):
        assert limiter.refusal(tenant) is None
    limiter.admit(tenant)
    assert limiter.num_in_flight["t"] == 1
    refused = limiter.refusal(tenant)
    assert isinstance(refused, RateLimitedError) and refused.retry_after_s == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.refusal(tenant) is None
    limiter.admit(tenant)
    refused = limiter.refusal(tenant)
    assert "concurrency" in str(refused) and limiter.num_in_flight["t"] == 2
