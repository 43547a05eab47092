"""One request's state inside the engine, from enqueue to finish."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from matryoshka_lora.engine.detokenizer import IncrementalDetokenizer, StopStringFilter
from matryoshka_lora.types import FinishReason, GenerationEvent, GenerationRequest, RankReason


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """token_ids = prompt + outputs so far; the first `num_computed` of them have their K/V in the cache.

    Next step's tokens are token_ids[num_computed:]: the (rest of the) prompt while prefilling, then the
    one token sampled last step. A step samples only when it computes up to the end of token_ids.
    """

    request: GenerationRequest
    emit: Callable[[GenerationEvent], None]
    adapter: str | None
    adapter_slot: int
    rank: int
    scale: float
    rank_reason: RankReason
    detokenizer: IncrementalDetokenizer
    stop_filter: StopStringFilter
    generator: torch.Generator | None  # None: greedy
    max_len: int  # max prompt + output tokens (min of max_model_len and prompt + max_tokens)
    predicted_latency_s: float | None = None  # a budgeted request's predicted latency, margin included
    budget_margin: float = 1.0  # the margin in it (the engine's LatencyMargin learns from the raw prediction)
    key: int = -1  # the engine's id of this sequence
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_computed: int = 0
    kv_slot: int | None = None
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    enqueue_t: float = field(default_factory=time.perf_counter)
    scheduled_t: float | None = None
    first_token_t: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def promised_s(self) -> float | None:
        """The cost model's raw prediction (before the margin) for a request served at a rank predicted to
        meet its budget (rank_reason "budget"); None for any other. What the LatencyMargin learns from."""
        if self.rank_reason != "budget" or not self.predicted_latency_s:
            return None
        return self.predicted_latency_s / self.budget_margin

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the prompt rest while prefilling, 1 while decoding."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.num_prompt_tokens

    def event(self, text: str = "", token_ids: list[int] | None = None, **extra) -> GenerationEvent:
        return GenerationEvent(
            request_id=self.request_id,
            text_delta=text,
            token_ids=token_ids or [],
            rank=self.rank,
            rank_reason=self.rank_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
            predicted_latency_s=self.predicted_latency_s,
            **extra,
        )

    def finished_event(
        self, text: str = "", token_ids: list[int] | None = None, error: str | None = None
    ) -> GenerationEvent:
        now = time.perf_counter()
        return self.event(
            text,
            token_ids,
            finished=True,
            finish_reason=self.finish_reason,
            queue_s=None if self.scheduled_t is None else self.scheduled_t - self.enqueue_t,
            ttft_s=None if self.first_token_t is None else self.first_token_t - self.enqueue_t,
            total_s=now - self.enqueue_t,
            error=error,
        )
