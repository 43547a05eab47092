"""The rank rules every backend applies at admission, before any cost prediction.

    rank and latency_budget_ms both given -> ConfigError
    cap = min(r_max, max_rank)                      (max_rank: the tenant's cap, when given)
    rank given                            -> that rank if 1 <= rank <= cap, "requested"; else InvalidRankError
    neither given                         -> cap, "default"
    latency_budget_ms given (> 0)         -> no rank yet: the backend picks among `candidates`
                                             (the train ranks <= cap, or [cap] when none is)
    after the pick, no rank predicted to meet the budget ("budget_unmet")
                                          -> served at the lowest candidate; or, when the request says
                                             refuse_unmet_budget, BudgetUnmetError (`check_budget_met`)
                                             unless its typical prediction (the median case, where the
                                             backend has one) meets the budget

    adapter None                          -> the base model, rank none or 0 (`is_base_request`)

The adapter lookup stays with each backend, which knows its adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

from matryoshka_lora.errors import BudgetUnmetError, ConfigError, InvalidRankError
from matryoshka_lora.types import GenerationRequest, RankReason


@dataclass(frozen=True)
class RankDecision:
    rank: int | None  # None: to be chosen for the budget among `candidates`
    reason: RankReason | None
    candidates: tuple[int, ...] = ()


def is_base_request(request: GenerationRequest) -> bool:
    """Check rank/budget exclusivity; True when the request is for the base model (rank none or 0)."""
    if request.rank is not None and request.latency_budget_ms is not None:
        raise ConfigError("rank / latency_budget_ms", (request.rank, request.latency_budget_ms), "at most one of them")
    if request.adapter is not None:
        return False
    if request.rank not in (None, 0):
        raise InvalidRankError(request.rank, "none or 0 for the base model")
    return True


def decide_rank(request: GenerationRequest, adapter: str, r_max: int, train_ranks: tuple[int, ...]) -> RankDecision:
    """Apply the module docstring's rules for a request on `adapter` (already found)."""
    cap = r_max
    if request.max_rank is not None:
        if not isinstance(request.max_rank, int) or isinstance(request.max_rank, bool) or request.max_rank < 1:
            raise ConfigError("max_rank", request.max_rank, "an integer >= 1")
        cap = min(cap, request.max_rank)
    if request.rank is not None:
        if not isinstance(request.rank, int) or isinstance(request.rank, bool) or not 1 <= request.rank <= cap:
            raise InvalidRankError(request.rank, f"1..{cap}", adapter=adapter)
        return RankDecision(request.rank, "requested")
    if request.latency_budget_ms is None:
        return RankDecision(cap, "default")
    if not request.latency_budget_ms > 0:
        raise ConfigError("latency_budget_ms", request.latency_budget_ms, "a number > 0")
    return RankDecision(None, None, tuple(r for r in train_ranks if r <= cap) or (cap,))


def check_budget_met(
    request: GenerationRequest, reason: RankReason, rank: int, predicted_s: float | None, typical_s: float | None = None
) -> None:
    """BudgetUnmetError for a request that refuses to be served late, when no rank met its budget and its
    typical prediction at `rank` (`typical_s`; None: no such estimate) does not meet it either. The error
    reports the typical prediction where there is one (its Retry-After is about the typical excess)."""
    if reason != "budget_unmet" or not request.refuse_unmet_budget:
        return
    if typical_s is not None and typical_s * 1000.0 <= request.latency_budget_ms:
        return
    likely_s = typical_s if typical_s is not None else predicted_s or 0.0
    raise BudgetUnmetError(request.latency_budget_ms, likely_s * 1000.0, rank)
