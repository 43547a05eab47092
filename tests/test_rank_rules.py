"""The refusal rule every backend shares (`check_budget_met`): who gets BudgetUnmetError."""

from __future__ import annotations

import pytest

from matryoshka_lora.errors import BudgetUnmetError
from matryoshka_lora.rank_rules import check_budget_met
from matryoshka_lora.types import GenerationRequest, SamplingParams


@pytest.mark.parametrize(
    "reason, refuse, predicted_s, typical_s, refused",
    [
        ("budget_unmet", True, 3.0, None, True),  # no typical estimate (the vLLM backend's table): refused
        ("budget_unmet", True, 3.0, 2.5, True),  # even the typical case is late for a 2 s budget
        ("budget_unmet", True, 3.0, 2.0, False),  # the typical case meets it exactly: served at the lowest rank
        ("budget_unmet", True, 3.0, 1.2, False),
        ("budget_unmet", False, 3.0, 2.5, False),  # --budget-unmet serve: never refused
        ("budget", True, 1.5, None, False),  # a rank met the budget
    ],
)
def test_who_is_refused(reason, refuse, predicted_s, typical_s, refused):
    request = GenerationRequest(
        "r", (1, 2), SamplingParams(max_tokens=4), "alpha", latency_budget_ms=2000.0, refuse_unmet_budget=refuse
    )
    if not refused:
        check_budget_met(request, reason, 1, predicted_s, typical_s)
        return
    with pytest.raises(BudgetUnmetError) as info:
        check_budget_met(request, reason, 1, predicted_s, typical_s)
    reported_s = predicted_s if typical_s is None else typical_s  # the typical case where there is one
    assert info.value.rank == 1 and info.value.predicted_ms == pytest.approx(reported_s * 1000.0)
