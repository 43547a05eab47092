"""The plain data that crosses between the server, the backends and the engine (the bottom layer: it
imports nothing of the package, so every layer above can use it).

    SamplingParams, GenerationRequest     what the server enqueues (validated)
    GenerationEvent                       what a request streams back, step by step
    AdapterInfo, EngineStats              what a backend reports
    RankReason, FinishReason              why a rank was served / a request ended
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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

    @classmethod
    def of(cls, name: str, manifest, path: str, r_max: int | None = None, train_ranks=None) -> AdapterInfo:
        """From an adapter's manifest (adapters.store.AdapterManifest), with the r_max and train ranks
        as served where a backend caps them."""
        return cls(
            name=name,
            r_max=manifest.r_max if r_max is None else r_max,
            train_ranks=tuple(manifest.train_ranks if train_ranks is None else train_ranks),
            method=manifest.method,
            scaling=manifest.scaling,
            target_modules=tuple(manifest.target_modules),
            base_model=manifest.base_model,
            path=str(path),
            eval_results=manifest.eval_results,
        )


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    max_num_seqs: int
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    budget_latency_margin: float = 1.0  # what the budget controller multiplies its predictions by (native)
