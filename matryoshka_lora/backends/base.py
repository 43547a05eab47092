"""The engine interface the HTTP layer talks to, and the plain data that crosses it.

The server only enqueues a `GenerationRequest` and awaits `GenerationEvent`s; it never touches tensors.
Two backends implement `EngineBackend`: the native engine (`matryoshka_lora.engine`, the CPU default)
and vLLM (`matryoshka_lora.backends.vllm_backend`, for GPU nodes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Literal, Protocol

RankReason = Literal["requested", "budget", "budget_unmet", "base", "default"]
"""Why a request got its rank: asked for; chosen as the highest rank predicted to meet the latency
budget; the lowest rank because no rank was predicted to meet it; base model (no adapter); the
adapter's r_max because the request named neither a rank nor a budget."""

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request, ready for the engine. Exactly one of `rank` / `latency_budget_ms` may be set."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    adapter: str | None = None  # None = base model
    rank: int | None = None
    latency_budget_ms: float | None = None
    max_rank: int | None = None  # the tenant's cap: a budget never picks a rank above it
    tenant: str = "default"  # for fair share between tenants
    refuse_unmet_budget: bool = False  # a budget no rank is predicted to meet: BudgetUnmetError, not rank served late


@dataclass
class GenerationEvent:
    """One step of a request's life, streamed to the waiting handler.

    The first event of a request carries `rank`/`rank_reason` (decided at admission); each later
    event carries the newly decoded text; the last one has `finished=True` and the timings.
    """

    request_id: str
    text_delta: str = ""
    token_ids: list[int] = field(default_factory=list)
    rank: int = 0
    rank_reason: RankReason = "base"
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    queue_s: float | None = None  # enqueue -> first scheduled
    ttft_s: float | None = None  # enqueue -> first token
    total_s: float | None = None  # enqueue -> finished
    predicted_latency_s: float | None = None  # the cost model's prediction, for budgeted requests
    error: str | None = None


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    r_max: int
    train_ranks: tuple[int, ...]
    method: str
    scaling: str
    target_modules: tuple[str, ...]
    base_model: str
    path: str
    eval_results: dict | None = None  # per-rank accuracy from the manifest, when it has it


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    max_num_seqs: int
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    budget_latency_margin: float = 1.0  # what the budget controller multiplies its predictions by (native)


class EngineBackend(Protocol):
    """What the HTTP layer needs from an engine. All methods are called from the server's event loop."""

    model_name: str

    async def start(self) -> None:
        """Load the model and adapters, warm up (and calibrate the cost model). `ready` is True after."""

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Stop admitting, let in-flight requests finish (up to the timeout), then stop the loop."""

    @property
    def ready(self) -> bool: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Enqueue the request and yield its events. Closing the iterator early aborts the request
        and frees its slot at once. Raises UnknownAdapterError / InvalidRankError before enqueueing."""

    def list_adapters(self) -> list[AdapterInfo]: ...

    async def load_adapter(self, path: str, name: str | None = None) -> AdapterInfo:
        """Load (or replace) an adapter from a directory while serving."""

    async def unload_adapter(self, name: str) -> None:
        """Unload an adapter; requests already running on it finish first."""

    def stats(self) -> EngineStats: ...

    def encode_prompt(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """Tokenise a raw prompt, or render chat messages with the model's chat template."""
