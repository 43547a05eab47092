"""The rank a request gets on the vLLM backend, decided once at admission.

Same rules as the native engine (`engine/budget/rank_policy.py`), with a simpler predictor for budgets:

    adapter None             -> rank 0, "base"
    rank given               -> that rank (1..cap), "requested";   cap = min(r_max served, max_rank)
    neither                  -> cap, "default"
    latency_budget_ms given  -> the highest candidate rank r (train ranks <= cap) with
                                predicted(r) = ttft(r) + max_tokens * tpot(r) <= budget, "budget";
                                else the lowest candidate, "budget_unmet" (or BudgetUnmetError when
                                the request refuses to be served late)

vLLM pads every LoRA slot to `max_lora_rank`, so its compute does not depend on the rank: the table
(`RankLatencyTable`) is a per-rank running mean (EWMA) of the time to first token and the time per
output token of finished requests, starting from a prior. Its rows converge to the same values, so a
budget mostly decides between "all candidate ranks fit" (the highest) and "none fits" (the lowest); the
per-rank rows are kept so that a rank-dependent cost (if a vLLM version ever has one) shows up by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from matryoshka_lora.backends.vllm_adapters import ServedAdapter
from matryoshka_lora.errors import ConfigError, UnknownAdapterError
from matryoshka_lora.rank_rules import check_budget_met, decide_rank, is_base_request
from matryoshka_lora.types import GenerationRequest, RankReason


@dataclass(frozen=True)
class RankChoice:
    adapter: ServedAdapter | None
    rank: int
    reason: RankReason
    predicted_s: float | None = None


class RankLatencyTable:
    """Per-rank EWMA of (time to first token, time per output token), in seconds; rank 0 = base model."""

    def __init__(self, prior_ttft_s: float = 0.1, prior_tpot_s: float = 0.03, weight: float = 0.2):
        if not 0 < weight <= 1:
            raise ConfigError("EWMA weight", weight, "a number in (0, 1]")
        self.prior = (prior_ttft_s, prior_tpot_s)
        self.weight = weight
        self.rows: dict[int, tuple[float, float]] = {}
        self._overall: tuple[float, float] | None = None

    def observe(self, rank: int, ttft_s: float, num_output_tokens: int, total_s: float) -> None:
        """Record a finished request: tpot = (total - ttft) / (output tokens - 1)."""
        tpot = (total_s - ttft_s) / (num_output_tokens - 1) if num_output_tokens > 1 else None
        for key in (rank, None):
            old = self.rows.get(key) if key is not None else self._overall
            old_ttft, old_tpot = old or self.prior
            w = self.weight if old else 1.0
            new = (old_ttft + w * (ttft_s - old_ttft), old_tpot if tpot is None else old_tpot + w * (tpot - old_tpot))
            if key is None:
                self._overall = new
            else:
                self.rows[key] = new

    def predict(self, rank: int, max_tokens: int) -> float:
        """Seconds for a request of `max_tokens` outputs at `rank`: its row, else all ranks', else the prior."""
        ttft, tpot = self.rows.get(rank) or self._overall or self.prior
        return ttft + max(max_tokens - 1, 0) * tpot


def resolve_rank(
    request: GenerationRequest, adapters: dict[str, ServedAdapter], table: RankLatencyTable, max_tokens: int
) -> RankChoice:
    """Apply the module docstring's rules; raises before anything is enqueued."""
    if is_base_request(request):
        return RankChoice(None, 0, "base")
    adapter = adapters.get(request.adapter)
    if adapter is None:
        raise UnknownAdapterError(request.adapter, sorted(adapters))
    decision = decide_rank(request, adapter.name, adapter.r_max, tuple(adapter.train_ranks))
    if decision.rank is not None:
        return RankChoice(adapter, decision.rank, decision.reason)
    candidates = list(decision.candidates)
    budget_s = request.latency_budget_ms / 1000.0
    for rank in sorted(candidates, reverse=True):
        predicted = table.predict(rank, max_tokens)
        if predicted <= budget_s:
            return RankChoice(adapter, rank, "budget", predicted)
    lowest = min(candidates)
    predicted = table.predict(lowest, max_tokens)
    check_budget_met(request, "budget_unmet", lowest, predicted)
    return RankChoice(adapter, lowest, "budget_unmet", predicted)
