"""Exception types shared by the whole package.

Every error carries what was given and what is allowed, so that the API layer
(the only place that maps errors to HTTP codes) can answer with a useful message.
"""

from __future__ import annotations

from typing import Any


class MatryoshkaError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MatryoshkaError, ValueError):
    """A setting or argument is invalid: `given` is what came in, `allowed` what would be accepted."""

    def __init__(self, what: str, given: Any, allowed: Any):
        self.what, self.given, self.allowed = what, given, allowed
        super().__init__(f"invalid {what}: got {given!r}, allowed: {allowed}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (True is an int in Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(what: str, value: Any, minimum: int = 1, allow_none: bool = False) -> Any:
    """value if it is an integer >= minimum (or None where allowed), else ConfigError saying so."""
    if (value is None and allow_none) or (is_int(value) and value >= minimum):
        return value
    raise ConfigError(what, value, ("None or " if allow_none else "") + f"an integer >= {minimum}")


class InvalidRankError(ConfigError):
    """A rank outside what an adapter offers."""

    def __init__(self, given: Any, allowed: Any, adapter: str | None = None):
        self.adapter = adapter
        what = f"rank for adapter {adapter!r}" if adapter else "rank"
        super().__init__(what, given, allowed)


class DatasetError(ConfigError):
    """A dataset task's data is not installed, or its file is missing or unreadable."""


class ModelNotFoundError(MatryoshkaError, FileNotFoundError):
    """The base model is missing (not installed, or the directory holds no model)."""


class AdapterFormatError(MatryoshkaError, ValueError):
    """An adapter directory is missing, corrupt, or does not match its manifest."""


class BaseModelMismatchError(AdapterFormatError):
    """An adapter was trained on another base model than the one it is loaded onto."""

    def __init__(self, adapter: str, expected: str, actual: str):
        self.adapter, self.expected, self.actual = adapter, expected, actual
        super().__init__(
            f"adapter {adapter!r} was trained on base model fingerprint {expected}, "
            f"but the loaded base model has fingerprint {actual}"
        )


class TargetModuleError(ConfigError):
    """A LoRA target name matched no module of the model."""


class UnknownAdapterError(MatryoshkaError, KeyError):
    """A request named an adapter that is not loaded."""

    def __init__(self, given: str, allowed: list[str]):
        self.given, self.allowed = given, allowed
        super().__init__(f"unknown adapter {given!r}; loaded adapters: {allowed}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class QueueFullError(MatryoshkaError):
    """The engine's waiting queue is full (the server answers 503); `limit` is its length."""

    def __init__(self, limit: int, what: str = "the engine's waiting queue is full"):
        self.limit = limit
        super().__init__(f"{what} ({limit} requests waiting); retry later")


class BudgetUnmetError(MatryoshkaError):
    """No rank is predicted to meet the request's latency budget, and the server refuses such requests
    (`--budget-unmet refuse`) rather than serve them late: 503, retry after about the predicted excess."""

    MAX_RETRY_AFTER_S = 60.0

    def __init__(self, budget_ms: float, predicted_ms: float, rank: int):
        self.budget_ms, self.predicted_ms, self.rank = budget_ms, predicted_ms, rank
        self.retry_after_s = min(max(1.0, (predicted_ms - budget_ms) / 1000.0), self.MAX_RETRY_AFTER_S)
        super().__init__(
            f"latency budget {budget_ms:g} ms cannot be met under the current load: even rank {rank} "
            f"is predicted to take {predicted_ms:.0f} ms; retry later or with a larger budget"
        )


class EngineStoppedError(QueueFullError):
    """The engine is shutting down (or not started) and admits no new request."""

    def __init__(self, state: str = "shutting down"):
        self.state = state
        MatryoshkaError.__init__(self, f"the engine is {state} and admits no new request")
        self.limit = 0
