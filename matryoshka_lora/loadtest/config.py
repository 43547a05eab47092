"""Typed settings of a load-test run, validated once where they enter (the CLI builds them).

Defaults are the documented workload of docs/performance.md: a fixed prompt of 128 tokens, 64 output
tokens, greedy, EOS ignored (so every request does the same work at every rank).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from matryoshka_lora.errors import ConfigError, check_count, is_int

SCENARIOS = ("rank-sweep", "mixed", "budget", "tenants", "overload", "soak", "peers")

# Per-phase duration (seconds) of each scenario when --duration is not given.
DEFAULT_DURATION_S = {
    "rank-sweep": 30.0,
    "mixed": 60.0,
    "budget": 30.0,
    "tenants": 60.0,
    "overload": 60.0,
    "soak": 600.0,
    "peers": 60.0,
}
DEFAULT_MAX_REQUESTS = 20_000  # per phase: every phase is bounded in count as well as in time
DEFAULT_R_MAX = 64  # r_max of the random adapters made when --adapters is not given


@dataclass(frozen=True)
class Workload:
    """What every request asks for: `prompt_tokens` of the fixed prompt, `output_tokens` to generate."""

    prompt_tokens: int = 128
    output_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            check_count(name, value)
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError("temperature", self.temperature, "0..2")


@dataclass(frozen=True)
class MixEntry:
    """One kind of request in a mix: an adapter (None = base) at a rank or with a latency budget."""

    adapter: str | None
    rank: int | None = None
    latency_budget_ms: float | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.rank is not None and self.latency_budget_ms is not None:
            raise ConfigError("mix entry", (self.rank, self.latency_budget_ms), "a rank or a budget, not both")
        if self.adapter is None and (self.rank is not None or self.latency_budget_ms is not None):
            raise ConfigError("mix entry", (self.rank, self.latency_budget_ms), "no rank or budget for the base model")
        if not self.weight > 0:
            raise ConfigError("mix weight", self.weight, "a number > 0")

    def entry(self) -> dict:
        """As a Plan's mix entry."""
        return {
            "adapter": self.adapter,
            "rank": self.rank,
            "latency_budget_ms": self.latency_budget_ms,
            "weight": self.weight,
        }


def _positive_ints(values, what: str) -> tuple[int, ...]:
    out = tuple(values)
    if not out or any(not is_int(v) or v < 1 for v in out):
        raise ConfigError(what, values, "one or more integers >= 1")
    return out


@dataclass
class LoadTestConfig:
    """One `matryoshka-lora loadtest SCENARIO` run.

    url: a running server; None = start `matryoshka-lora serve` on a free loopback port.
    model: the server's model directory (also the tokenizer of the fixed prompt); None = the default.
    adapters: adapter directories for the server it starts; empty = random adapters at `r_max` made
      for `model` under OUT/adapters.
    duration_s: per phase (one rank x concurrency cell, one rate step, ...); None = the scenario's default.
    """

    scenario: str
    out: Path | None = None
    url: str | None = None
    model: str | None = None
    adapters: list[Path] = field(default_factory=list)
    duration_s: float | None = None
    max_requests: int = DEFAULT_MAX_REQUESTS
    workload: Workload = field(default_factory=Workload)
    ranks: tuple[int, ...] | None = None  # None: 1, 8, 32 and r_max (those <= r_max)
    users: tuple[int, ...] = (1, 4, 16)
    num_threads: int | None = None  # the server's (and the in-process peers') torch threads
    max_num_seqs: int = 32  # for the server it starts
    max_queue_len: int = 32  # for the server it starts in `overload` (the bound the check expects)
    r_max: int = DEFAULT_R_MAX
    budget_ms: float | None = None  # None: budget_factor x the unloaded latency at r_max
    budget_factor: float = 3.0
    rates: tuple[float, ...] | None = None  # budget: offered rates (req/s); None = multiples of capacity
    budget_unmet: str = "serve"  # budget: the server's --budget-unmet (serve | refuse), for the server it starts
    peers: bool = False  # rank-sweep: also run the peers
    vllm_python: Path | None = None
    api_key: str | None = None  # for a --url server with tenants
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ConfigError("scenario", self.scenario, list(SCENARIOS))
        if self.out is None:
            self.out = Path("loadtest-results") / f"{self.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.out = Path(self.out)
        self.adapters = [Path(a) for a in self.adapters]
        missing = [str(a) for a in self.adapters if not a.is_dir()]
        if missing:
            raise ConfigError("--adapters", missing, "existing adapter directories")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigError("--url", self.url, "http://HOST:PORT")
        if self.url is not None and self.scenario == "tenants":
            raise ConfigError("--url", self.url, "none for `tenants`: it starts a server with its own tenants file")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError("--duration", self.duration_s, "seconds > 0")
        for name in ("max_requests", "max_num_seqs", "max_queue_len", "r_max"):
            check_count(f"--{name.replace('_', '-')}", getattr(self, name))
        self.users = _positive_ints(self.users, "--users")
        if self.ranks is not None:
            self.ranks = _positive_ints(self.ranks, "--ranks")
        if self.budget_ms is not None and not self.budget_ms > 0:
            raise ConfigError("--budget-ms", self.budget_ms, "milliseconds > 0")
        if not self.budget_factor > 0:
            raise ConfigError("--budget-factor", self.budget_factor, "a number > 0")
        if self.budget_unmet not in ("serve", "refuse"):
            raise ConfigError("--budget-unmet", self.budget_unmet, ["serve", "refuse"])
        if self.rates is not None and (not self.rates or any(not r > 0 for r in self.rates)):
            raise ConfigError("--rates", self.rates, "one or more requests/s > 0")
        if self.vllm_python is not None and not Path(self.vllm_python).is_file():
            raise ConfigError("--vllm-python", str(self.vllm_python), "the python of a venv with vLLM")

    @property
    def phase_s(self) -> float:
        return self.duration_s if self.duration_s is not None else DEFAULT_DURATION_S[self.scenario]
