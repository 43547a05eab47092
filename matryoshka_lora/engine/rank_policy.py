"""Which adapter slot and rank a request gets, decided once at admission.

    adapter None                 -> rank 0, "base"
    rank given                   -> that rank (1..min(r_max, max_rank)), "requested"
    latency_budget_ms given      -> highest candidate rank (train ranks <= max_rank) predicted by the
                                    cost model to meet the budget, "budget"; else the lowest, "budget_unmet"
    neither                      -> min(r_max, max_rank), "default"
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from matryoshka_lora.backends.base import GenerationRequest, RankReason
from matryoshka_lora.engine.adapter_slots import AdapterSlots, SlotEntry
from matryoshka_lora.engine.cost_model import CostModel, LoadSnapshot
from matryoshka_lora.engine.scheduler import Scheduler
from matryoshka_lora.errors import ConfigError, InvalidRankError, UnknownAdapterError


@dataclass(frozen=True)
class RankChoice:
    entry: SlotEntry | None
    rank: int
    reason: RankReason
    predicted_s: float | None = None


def load_snapshot(scheduler: Scheduler) -> LoadSnapshot:
    running = scheduler.running
    remaining = [max(s.max_len - len(s.token_ids), 0) for s in running]
    return LoadSnapshot(
        num_running=len(running),
        num_waiting=scheduler.num_waiting,
        max_num_seqs=scheduler.kv.max_num_seqs,
        lora_work=sum(s.rank for s in running),
        num_segments=len({(s.adapter_slot, s.rank) for s in running if s.rank > 0}),
        context_sum=sum(len(s.token_ids) for s in running),
        mean_remaining=statistics.fmean(remaining) if remaining else 0.0,
        max_num_batched_tokens=scheduler.max_num_batched_tokens,
    )


def resolve_rank(
    request: GenerationRequest, adapters: AdapterSlots, cost_model: CostModel, scheduler: Scheduler, max_model_len: int
) -> RankChoice:
    if request.rank is not None and request.latency_budget_ms is not None:
        raise ConfigError("rank / latency_budget_ms", (request.rank, request.latency_budget_ms), "at most one of them")
    if request.adapter is None:
        if request.rank not in (None, 0):
            raise InvalidRankError(request.rank, "none or 0 for the base model")
        return RankChoice(None, 0, "base")
    entry = adapters.get(request.adapter)
    if entry is None:
        raise UnknownAdapterError(request.adapter, adapters.names())
    cap = entry.r_max
    if request.max_rank is not None:
        if not isinstance(request.max_rank, int) or request.max_rank < 1:
            raise ConfigError("max_rank", request.max_rank, "an integer >= 1")
        cap = min(cap, request.max_rank)
    if request.rank is not None:
        if not isinstance(request.rank, int) or isinstance(request.rank, bool) or not 1 <= request.rank <= cap:
            raise InvalidRankError(request.rank, f"1..{cap}", adapter=entry.name)
        return RankChoice(entry, request.rank, "requested")
    if request.latency_budget_ms is None:
        return RankChoice(entry, cap, "default")
    if not request.latency_budget_ms > 0:
        raise ConfigError("latency_budget_ms", request.latency_budget_ms, "a number > 0")
    candidates = [r for r in entry.train_ranks if r <= cap] or [cap]
    num_prompt = len(request.prompt_token_ids)
    max_tokens = min(request.sampling.max_tokens, max_model_len - num_prompt)
    rank, met, predicted = cost_model.choose_rank(
        load_snapshot(scheduler), num_prompt, max_tokens, candidates, request.latency_budget_ms / 1000.0
    )
    return RankChoice(entry, rank, "budget" if met else "budget_unmet", predicted)
