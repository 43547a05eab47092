"""The prefill steps a prediction plans are the steps the scheduler runs: per prompt chunks, in order."""

from __future__ import annotations

import pytest

from matryoshka_lora.engine.budget.step_features import PendingPrompt, StepFeatures, plan_prefill, step_features

from ..engine_support import request

NO_LORA = (0, 0, 0)


@pytest.mark.parametrize(
    "prompts, rows, budget, expected",
    [
        # one 10-token prompt beside 2 decode rows: one step, the prompt attends to itself only
        ((PendingPrompt(10),), 2, 64, [StepFeatures(12, 0, 0, 0, 100, 3)]),
        # two prompts share a step: attention per prompt (2 x 10 x 10, not 20 x 20)
        ((PendingPrompt(10), PendingPrompt(10)), 0, 64, [StepFeatures(20, 0, 0, 0, 200, 2)]),
        # chunked: 14 of 16 tokens per step beside 2 rows; the second chunk attends to the first
        ((PendingPrompt(20),), 2, 16, [StepFeatures(16, 0, 0, 0, 14 * 14, 2), StepFeatures(8, 0, 0, 0, 6 * 20, 3)]),
        # a prompt half done, then one at rank 8: a LoRA group of its own; the first's row decodes next step
        (
            (PendingPrompt(4, 6), PendingPrompt(12, 0, 8)),
            0,
            10,
            [StepFeatures(10, 6 * 8, 8, 1, 4 * 10 + 6 * 6, 1), StepFeatures(7, 6 * 8, 8, 1, 6 * 12, 2)],
        ),
        # nothing pending: no step
        ((PendingPrompt(0),), 3, 16, []),
    ],
)
def test_plan_prefill_by_hand(prompts, rows, budget, expected):
    assert plan_prefill(prompts, rows, NO_LORA, 0, budget) == expected


def test_the_decode_rows_cost_rides_along():
    [step] = plan_prefill((PendingPrompt(4, 0, 2),), 3, (30, 10, 2), 500, 64)
    assert step == StepFeatures(7, 30 + 4 * 2, 10 + 2, 3, 500 + 16, 4)


def test_the_plan_matches_the_steps_the_engine_runs(make_engine):
    """Two requests decoding, three prompts waiting: the planned steps' tokens and samples are the engine's."""
    from matryoshka_lora.engine.budget.rank_policy import load_snapshot

    engine = make_engine(max_num_seqs=8, max_num_batched_tokens=6)
    for i in range(2):
        engine.add_request(request(i, max_tokens=30), lambda e: None)
    while any(s.is_prefilling for s in engine.scheduler.running) or engine.scheduler.num_waiting:
        engine.step()
    for i in range(2, 5):
        engine.add_request(request(i, max_tokens=30), lambda e: None)
    load = load_snapshot(engine.scheduler)
    plan = plan_prefill(
        load.pending_prompts, load.num_running - load.num_prefilling, NO_LORA, 0, load.max_num_batched_tokens
    )
    observed = []
    observe = engine.budget.cost_model.observe
    engine.budget.cost_model.observe = lambda f, seconds: (observed.append(f), observe(f, seconds))
    while any(s.is_prefilling for s in engine.scheduler.running) or engine.scheduler.num_waiting:
        engine.step()
    assert len(plan) == len(observed) > 1
    assert [(f.num_tokens, f.num_sampled) for f in plan] == [(f.num_tokens, f.num_sampled) for f in observed]


@pytest.mark.parametrize(
    "token_counts, max_one_call_rows, per_call",
    [
        ([1, 1, 1], 16, 0),  # decode rows within the one-call path
        ([1] * 17, 16, 1),  # more rows than it takes
        ([1, 5], 16, 1),  # a prompt chunk: llama.forward
        ([1], 0, 1),  # no one-call path (torch ops)
    ],
)
def test_per_call_marks_the_steps_that_run_llama_forward(token_counts, max_one_call_rows, per_call):
    from matryoshka_lora.engine.model_runner import StepItem

    items = [StepItem([3] * n, i, 10, True) for i, n in enumerate(token_counts)]
    features = step_features(items, [], max_one_call_rows)
    assert features.per_call == per_call
    assert features.vector()[-3:].tolist() == [per_call, 0, (1 - per_call) * sum(token_counts)]


def test_the_engine_tells_the_cost_model_its_one_call_rows(make_engine):
    engine = make_engine()
    rows = engine.runner.max_one_call_rows
    assert engine.budget.cost_model.max_one_call_rows == rows
    assert rows == (0 if engine.runner.decode_layers is None else engine.runner.decode_layers.max_rows or 4)
