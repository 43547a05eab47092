"""Which adapter slot and rank a request gets, decided once at admission.

adapter None                 -> rank 0, "base"
rank given                   -> that rank (1..min(r_max, max_rank)), "requested"
latency_budget_ms given      -> highest candidate rank (train ranks <= max_rank) predicted by the
                                cost model (times its learned margin) to meet the budget while a next
                                request like it would still meet it at the lowest rank, "budget";
                                else the lowest, "budget_unmet"
                                (or BudgetUnmetError when the request refuses to be served late and
                                the typical margin's prediction at the lowest rank misses too)
neither                      -> min(r_max, max_rank), "default"
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, replace

from matryoshka_lora.engine.adapter_slots import AdapterSlots, SlotEntry
from matryoshka_lora.engine.budget.arrivals import Arrivals
from matryoshka_lora.engine.budget.cost_model import CostModel, LoadSnapshot
from matryoshka_lora.engine.budget.step_features import PendingPrompt
from matryoshka_lora.engine.scheduler import Scheduler
from matryoshka_lora.errors import UnknownAdapterError
from matryoshka_lora.rank_rules import check_budget_met, decide_rank, is_base_request
from matryoshka_lora.types import GenerationRequest, RankReason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankChoice:
    entry: SlotEntry | None
    rank: int
    reason: RankReason
    predicted_s: float | None = None  # with the margin
    margin: float = 1.0  # the latency margin the prediction was scaled by


def load_snapshot(scheduler: Scheduler, arrivals: Arrivals | None = None) -> LoadSnapshot:
    """The running set plus the waiting requests that free KV slots will admit next: they all
    run together; and the recent arrival rates of prefill seconds and of output tokens asked for."""
    running = scheduler.running
    admitted_seqs = scheduler.waiting_seqs()[: scheduler.kv.num_free_slots]
    active = running + admitted_seqs
    remaining = [max(s.max_len - len(s.token_ids), 0) for s in active]
    adapters: dict[int, list[int]] = {}  # slot -> its sequences' ranks
    for s in active:
        if s.rank > 0:
            adapters.setdefault(s.adapter_slot, []).append(s.rank)
    now = time.perf_counter()
    snapshot = LoadSnapshot(
        num_running=len(running),
        num_waiting=scheduler.num_waiting,
        max_num_seqs=scheduler.kv.max_num_seqs,
        adapters=tuple((slot, tuple(sorted(ranks))) for slot, ranks in sorted(adapters.items())),
        context_sum=sum(len(s.token_ids) for s in active),
        mean_remaining=statistics.fmean(remaining) if remaining else 0.0,
        max_num_batched_tokens=scheduler.max_num_batched_tokens,
        num_admitted=len(admitted_seqs),
        pending_prompts=tuple(
            PendingPrompt(s.num_prompt_tokens - s.num_computed, s.num_computed, s.rank)
            for s in active
            if s.is_prefilling
        ),
        num_prefilling=sum(1 for s in running if s.is_prefilling),
    )
    if arrivals is None:
        return snapshot
    return replace(
        snapshot,
        prefill_share=arrivals.prefill_seconds.rate(now),
        decode_tokens_per_s=arrivals.decode_tokens.rate(now),
    )


def request_lengths(request: GenerationRequest, max_model_len: int) -> tuple[int, int]:
    """(prompt tokens, the most output tokens it can get: max_tokens within max_model_len)."""
    num_prompt = len(request.prompt_token_ids)
    return num_prompt, min(request.sampling.max_tokens, max_model_len - num_prompt)


def resolve_rank(
    request: GenerationRequest,
    adapters: AdapterSlots,
    cost_model: CostModel,
    load: LoadSnapshot,
    max_model_len: int,
) -> RankChoice:
    """The request's adapter slot and rank (the module docstring's rules), `load` what the engine is doing."""
    if is_base_request(request):
        return RankChoice(None, 0, "base")
    entry = adapters.get(request.adapter)
    if entry is None:
        raise UnknownAdapterError(request.adapter, adapters.names())
    decision = decide_rank(request, entry.name, entry.r_max, tuple(entry.train_ranks))
    if decision.rank is not None:
        return RankChoice(entry, decision.rank, decision.reason)
    candidates = list(decision.candidates)
    num_prompt, max_tokens = request_lengths(request, max_model_len)
    margin = cost_model.margin.value()
    rank, met, predicted, parts = cost_model.choose_rank(
        load,
        entry.slot,
        num_prompt,
        max_tokens,
        candidates,
        request.latency_budget_ms / 1000.0,
        margin,
    )
    reason = "budget" if met else "budget_unmet"
    typical = None if met or not cost_model.refuse_on_typical else predicted / margin * cost_model.margin.typical()
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "%s: budget %.2f s -> rank %d (%s): predicted %.2f s = margin %.2f x [%s]%s; running %d, "
            "waiting %d, pending prefill %d, arriving prefill %.2f s/s + %.0f output tokens/s, step correction %.2f",
            request.request_id,
            request.latency_budget_ms / 1000.0,
            rank,
            reason,
            predicted,
            margin,
            parts.describe(),
            "" if typical is None else f", typical {typical:.2f} s",
            load.num_running,
            load.num_waiting,
            load.pending_prefill,
            load.prefill_share,
            load.decode_tokens_per_s,
            cost_model.correction,
        )
    check_budget_met(request, reason, rank, predicted, typical)
    return RankChoice(entry, rank, reason, predicted, margin)
