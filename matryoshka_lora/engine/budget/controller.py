"""The latency-budget controller: the engine's one door to the budget machinery.

    choose(request)                            at admission: the adapter slot and rank (rank_policy),
                                               then the request counts as an arrival (arrivals): its
                                               prefill's seconds at that rank, its output tokens
    observe_step(items, lora_groups, seconds)  after every forward: refines the cost model
    observe_finished(done, now)                after every step: the latency margin learns from the
                                               promised requests, running and finished (latency_margin)
    margin()                                   the current latency margin, for the stats

The engine calls these under its lock (observe_step excepted: it touches only the cost model, which
only the loop thread writes).
"""

from __future__ import annotations

import logging
import time

from matryoshka_lora.engine.adapter_slots import AdapterSlots
from matryoshka_lora.engine.budget.arrivals import Arrivals
from matryoshka_lora.engine.budget.cost_model import CostModel
from matryoshka_lora.engine.budget.latency_margin import in_flight_ratios
from matryoshka_lora.engine.budget.rank_policy import RankChoice, load_snapshot, request_lengths, resolve_rank
from matryoshka_lora.engine.budget.step_features import step_features
from matryoshka_lora.engine.config import check_layers_off
from matryoshka_lora.engine.scheduler import Scheduler
from matryoshka_lora.engine.sequence import Sequence
from matryoshka_lora.types import GenerationRequest

log = logging.getLogger(__name__)


class BudgetController:
    def __init__(
        self,
        scheduler: Scheduler,
        adapters: AdapterSlots,
        max_model_len: int,
        layers_off=(),
        max_one_call_rows: int = 0,
    ):
        self.scheduler = scheduler
        self.adapters = adapters
        self.max_model_len = max_model_len
        layers_off = check_layers_off(layers_off)
        self.cost_model = CostModel(
            refuse_on_typical="typical" not in layers_off,
            headroom="headroom" not in layers_off,
            max_one_call_rows=max_one_call_rows,
        )
        self.arrivals = Arrivals()  # prefill seconds/s and output tokens/s arriving, for the predictions

    def choose(self, request: GenerationRequest) -> RankChoice:
        """The request's adapter slot and rank; raises (unknown adapter, bad rank, budget refused)."""
        load = load_snapshot(self.scheduler, self.arrivals)
        choice = resolve_rank(request, self.adapters, self.cost_model, load, self.max_model_len)
        num_prompt, max_tokens = request_lengths(request, self.max_model_len)
        prefill_s = self.cost_model.marginal_prefill_s(load, num_prompt, choice.rank)
        self.arrivals.add(prefill_s, max_tokens, time.perf_counter())
        return choice

    def observe_step(self, items, lora_groups, seconds: float) -> None:
        self.cost_model.observe(step_features(items, lora_groups, self.cost_model.max_one_call_rows), seconds)

    def observe_finished(self, done: list[Sequence], now: float) -> None:
        """After a step: the running promised requests' projected ratios, then what the finished ones took."""
        self.cost_model.margin.in_flight(in_flight_ratios(self.scheduler.running, now), now)
        for s in done:
            self.arrivals.finished(s.num_output_tokens, s.max_len - s.num_prompt_tokens)
            if s.promised_s and s.finish_reason == "length":
                self.cost_model.margin.observe(s.promised_s, now - s.enqueue_t, now)
            if s.predicted_latency_s:
                log.debug(
                    "%s (rank %d, %s) took %.2f s, predicted %.2f s with margin %.2f",
                    s.request_id,
                    s.rank,
                    s.rank_reason,
                    now - s.enqueue_t,
                    s.predicted_latency_s,
                    s.budget_margin,
                )

    def margin(self) -> float:
        return self.cost_model.margin.value()
