"""A scripted EngineBackend for HTTP-layer tests that need exact control (timing, failures, aborts).

Tokens are words: `encode_prompt` splits on whitespace, and output token i is the text "w{i} ".
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from matryoshka_lora.errors import InvalidRankError, QueueFullError, UnknownAdapterError
from matryoshka_lora.types import AdapterInfo, EngineStats, GenerationEvent, GenerationRequest


def fake_adapter(name: str, r_max: int = 8, train_ranks=(1, 2, 4, 8), eval_results=None) -> AdapterInfo:
    return AdapterInfo(
        name=name,
        r_max=r_max,
        train_ranks=tuple(train_ranks),
        method="matryoshka",
        scaling="none",
        target_modules=("q_proj",),
        base_model="fake-base",
        path=f"/adapters/{name}",
        eval_results=eval_results,
    )


@dataclass
class FakeBackend:
    adapters: dict[str, AdapterInfo] = field(default_factory=lambda: {"alpha": fake_adapter("alpha")})
    token_delay_s: float = 0.0
    max_in_flight: int = 1000
    fail_with: str | None = None  # finish every request with finish_reason "error" and this message
    model_name: str = "fake-base"
    received: list[GenerationRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    in_flight: set[str] = field(default_factory=set)
    _ready: bool = False

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self, drain_timeout_s: float) -> None:
        deadline = time.monotonic() + drain_timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def generate(self, request: GenerationRequest):
        if request.adapter is not None and request.adapter not in self.adapters:
            raise UnknownAdapterError(request.adapter, sorted(self.adapters))
        if request.adapter is not None and request.rank is not None:
            r_max = self.adapters[request.adapter].r_max
            if not 1 <= request.rank <= r_max:
                raise InvalidRankError(request.rank, f"1..{r_max}", request.adapter)
        if len(self.in_flight) >= self.max_in_flight:
            raise QueueFullError(self.max_in_flight)
        self.received.append(request)
        return self._run(request)

    def _rank(self, request: GenerationRequest) -> tuple[int, str]:
        if request.adapter is None:
            return 0, "base"
        info = self.adapters[request.adapter]
        if request.rank is not None:
            return request.rank, "requested"
        if request.latency_budget_ms is not None:
            cap = min(info.r_max, request.max_rank or info.r_max)
            ok = [r for r in info.train_ranks if r <= cap and r * 100 <= request.latency_budget_ms]
            return (max(ok), "budget") if ok else (min(info.train_ranks), "budget_unmet")
        return min(info.r_max, request.max_rank or info.r_max), "default"

    async def _run(self, request: GenerationRequest):
        rid = request.request_id
        rank, reason = self._rank(request)
        started = time.monotonic()
        self.in_flight.add(rid)
        finished = False
        try:
            yield GenerationEvent(request_id=rid, rank=rank, rank_reason=reason)
            n = request.sampling.max_tokens
            for i in range(n - 1):
                await asyncio.sleep(self.token_delay_s)
                yield GenerationEvent(request_id=rid, text_delta=f"w{i} ", token_ids=[i], rank=rank, rank_reason=reason)
            await asyncio.sleep(self.token_delay_s)
            total = time.monotonic() - started
            finished = True
            yield GenerationEvent(
                request_id=rid,
                text_delta=f"w{n - 1} ",
                token_ids=[n - 1],
                rank=rank,
                rank_reason=reason,
                finished=True,
                finish_reason="error" if self.fail_with else "length",
                num_prompt_tokens=len(request.prompt_token_ids),
                num_output_tokens=n,
                queue_s=0.001,
                ttft_s=min(total, 0.002),
                total_s=total,
                error=self.fail_with,
            )
        finally:
            self.in_flight.discard(rid)
            if not finished:
                self.aborted.append(rid)

    def list_adapters(self) -> list[AdapterInfo]:
        return list(self.adapters.values())

    async def load_adapter(self, path: str, name: str | None = None) -> AdapterInfo:
        info = fake_adapter(name or path.rstrip("/").rsplit("/", 1)[-1])
        self.adapters[info.name] = info
        return info

    async def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.in_flight),
            num_waiting=0,
            kv_cache_usage=0.25,
            max_num_seqs=4,
            running_adapters=tuple(sorted(self.adapters)),
        )

    def encode_prompt(self, prompt: str | None, messages: list[dict] | None) -> list[int]:
        text = prompt if prompt is not None else " ".join(m["content"] for m in messages)
        return list(range(len(text.split())))
