"""The cost model recovers step-time coefficients and picks ranks as specified."""

from __future__ import annotations

import numpy as np
import pytest

from matryoshka_lora.engine.budget.cost_model import CostModel, LoadSnapshot, decode_lora, nnls
from matryoshka_lora.engine.budget.step_features import StepFeatures

TRUE = np.array([4e-3, 2e-4, 5e-7, 2e-5, 1e-4, 3e-8, 6e-4, 2e-3, 3e-4, 4e-4])


def synthetic(n=60, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        f = StepFeatures(
            int(rng.integers(1, 256)),
            int(rng.integers(0, 4096)),
            int(rng.integers(0, 256)),
            int(rng.integers(0, 6)),
            int(rng.integers(0, 20000)),
            int(rng.integers(1, 32)),
            int(rng.integers(0, 2)),
        )
        t = float(f.vector() @ TRUE) * (1 + noise * rng.standard_normal())
        samples.append((f, t))
    return samples


def test_fit_recovers_coefficients():
    model = CostModel()
    model.fit(synthetic())
    np.testing.assert_allclose(model.coef, TRUE, rtol=1e-6)


def test_nnls_never_negative():
    x = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    y = np.array([3.0, 2.0, 1.0])  # decreasing: plain least squares gives a negative slope
    coef = nnls(x, y)
    assert (coef >= 0).all() and coef[1] == 0.0


def test_online_correction_tracks_a_slower_machine():
    model = CostModel(ema=0.2)
    model.fit(synthetic())
    f = StepFeatures(16, 16 * 8, 8, 1, 16 * 100, 16)
    for _ in range(60):
        model.observe(f, 2.0 * float(f.vector() @ TRUE))
    assert model.predict_step(f) == pytest.approx(2.0 * float(f.vector() @ TRUE), rel=1e-3)


def load(num_running=4, num_waiting=0, max_num_seqs=8) -> LoadSnapshot:
    return LoadSnapshot(
        num_running,
        num_waiting,
        max_num_seqs,
        adapters=((0, (8, 8)), (1, (4, 4))),
        context_sum=4 * 50,
        mean_remaining=20.0,
        max_num_batched_tokens=256,
    )


def test_latency_grows_with_rank_and_load():
    model = CostModel(coef=TRUE.copy())
    ranks = [model.predict_latency(load(), 2, 20, 32, r) for r in (0, 1, 8, 64)]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]
    assert model.predict_latency(load(num_running=8, num_waiting=8), 2, 20, 32, 8) > model.predict_latency(
        load(), 2, 20, 32, 8
    )


@pytest.mark.parametrize(
    "budget_factor, expected_rank, met",
    [
        (10.0, 64, True),  # generous: the highest candidate
        (1.0, None, True),  # exactly the rank-8 prediction: rank 8 meets it, 64 does not
        (0.01, 1, False),  # impossible: the lowest, flagged unmet
    ],
)
def test_choose_rank(budget_factor, expected_rank, met):
    model = CostModel(coef=TRUE.copy(), headroom=False)  # the plain rule: the highest rank that fits
    snap = load()
    budget = model.predict_latency(snap, 2, 20, 32, 8) * budget_factor
    rank, ok, predicted, _ = model.choose_rank(snap, 2, 20, 32, [1, 2, 4, 8, 16, 32, 64], budget)
    assert rank == (expected_rank or 8) and ok is met
    assert predicted == pytest.approx(model.predict_latency(snap, 2, 20, 32, rank))


@pytest.mark.parametrize(
    "margin, expected_rank, met",
    [
        (1.0, 8, True),  # the budget is the rank-8 prediction
        (1.5, 1, False),  # 1.5 x every prediction: the budget no longer fits rank 8, nor rank 1 (within 1.5x)
    ],
)
def test_choose_rank_scales_predictions_by_the_margin(margin, expected_rank, met):
    model = CostModel(coef=TRUE.copy(), headroom=False)
    snap = load()
    budget = model.predict_latency(snap, 2, 20, 32, 8)
    rank, ok, predicted, _ = model.choose_rank(snap, 2, 20, 32, [1, 8, 64], budget, margin)
    assert (rank, ok) == (expected_rank, met)
    assert predicted == pytest.approx(margin * model.predict_latency(snap, 2, 20, 32, rank))


def test_choose_rank_uses_the_learned_margin_by_default():
    model = CostModel(coef=TRUE.copy())
    snap = load()
    budget = model.predict_latency(snap, 2, 20, 32, 8)
    for _ in range(model.margin.min_samples):
        model.margin.observe(1.0, 2.0)  # requests took twice their prediction
    assert model.choose_rank(snap, 2, 20, 32, [8], budget)[:2] == (8, False)


@pytest.mark.parametrize(
    "adapters, slot, rank, expected",
    [
        ((), 0, 0, (0, 0, 0)),  # base only
        ((), 0, 8, (8, 8, 1)),  # the first LoRA row: one group at its rank
        (((0, (64, 64, 64)),), 0, 1, (3 * 64 + 16, 64, 1)),  # joins a rank-64 group: read at 64, computed at 16
        (((0, (8, 8, 8)),), 0, 32, (3 * 16 + 32, 32, 1)),  # raises its adapter's group to 32
        (((0, (8, 8, 8)),), 1, 2, (3 * 8 + 2, 8 + 2, 2)),  # another adapter: a group of its own
        (((0, (4,) * 64),), 0, 4, (65 * 4, 2 * 4, 2)),  # past MAX_MASKED_ROWS rows: two groups
        (((0, (1,) * 63 + (64,)),), 0, 1, (64 + 64, 1 + 64, 2)),  # ordered by rank: 64 rank-1 rows, then the 64
    ],
)
def test_decode_lora_follows_the_op_grouping(adapters, slot, rank, expected):
    assert decode_lora(adapters, slot, rank) == expected


def test_refits_on_observed_steps():
    """A machine twice as slow per token as warm-up measured: after refits the per-token cost follows."""
    model = CostModel(refit_every=32, ema=0.0)
    model.fit(synthetic(n=40))
    slow = TRUE * np.array([1, 4, 1, 1, 1, 1, 1, 1, 1, 1])
    for f, _ in synthetic(n=320, seed=1):
        model.observe(f, float(f.vector() @ slow))
    f = StepFeatures(200, 0, 0, 0, 0, 1)
    assert model.predict_step(f) == pytest.approx(float(f.vector() @ slow), rel=0.2)


@pytest.mark.parametrize("prefill_share, expected", [(0.0, 1.0), (0.5, 2.0), (0.99, 20.0)])
def test_arrivals_stretch_the_prediction(prefill_share, expected):
    """rho_p = prefill seconds arriving per second: half the machine taken by arrivals doubles the time."""
    from dataclasses import replace

    model = CostModel(coef=TRUE.copy())
    quiet = model.predict_latency(load(), 2, 20, 32, 8)
    busy = model.predict_latency(replace(load(), prefill_share=prefill_share), 2, 20, 32, 8)
    assert model.arrival_stretch(prefill_share) == pytest.approx(expected)
    assert busy == pytest.approx(quiet * expected)  # no queue in load(): all of it is stretched


@pytest.mark.parametrize("num_running", [0, 4])
@pytest.mark.parametrize("rank", [0, 8])
def test_marginal_prefill_is_what_a_prompt_adds_to_the_steps(num_running, rank):
    """Alone: its prefill steps' time; beside decode rows: those steps less the decode-only steps they replace."""
    from dataclasses import replace

    from matryoshka_lora.engine.budget.step_features import PendingPrompt, plan_prefill

    model = CostModel(coef=TRUE.copy(), max_one_call_rows=16)
    snap = replace(load(num_running=num_running), max_num_batched_tokens=64)
    if num_running == 0:
        snap = replace(snap, adapters=(), context_sum=0)
    steps = plan_prefill(
        (PendingPrompt(150, 0, rank),), num_running, decode_lora(snap.adapters, -1, 0), snap.context_sum, 64
    )
    assert len(steps) == 3  # 150 tokens in chunks of 64 less the decode rows
    with_prompt = sum(model.predict_step(f) for f in steps)
    decode_only = StepFeatures(num_running, *decode_lora(snap.adapters, -1, 0), snap.context_sum, num_running, 0)
    want = with_prompt - (3 * model.predict_step(decode_only) if num_running else 0.0)
    assert model.marginal_prefill_s(snap, 150, rank) == pytest.approx(want)
    assert model.marginal_prefill_s(snap, 150, 8) >= model.marginal_prefill_s(snap, 150, 0) > 0


def linear_step(t0: float, per_row: float):
    return lambda rows: t0 + per_row * rows


@pytest.mark.parametrize(
    "demand, free_share, expected",
    [
        (0.0, 1.0, 4.0),  # nothing arriving: the active set alone
        (10.0, 1.0, 4.0),  # N = 10 * (0.1 + 0.01 N) -> 1.11 rows < the 4 active: stays 4
        (50.0, 1.0, 10.0),  # N = 50 * (0.1 + 0.01 N) -> N = 5 / 0.5 = 10
        (25.0, 0.5, 10.0),  # half the machine on prefill: the same rows as twice the demand
        (100.0, 1.0, None),  # 16 rows serve 16 / 0.26 = 61.5 tok/s < 100: saturated
        (62.0, 1.0, None),  # just past capacity
    ],
)
def test_sustained_rows_is_littles_law(demand, free_share, expected):
    from matryoshka_lora.engine.budget.cost_model import sustained_rows

    rows = sustained_rows(demand, free_share, 4, 16, linear_step(0.1, 0.01))
    assert rows == (pytest.approx(expected, rel=1e-6) if expected is not None else None)


def test_decode_demand_past_capacity_makes_every_budget_unmet():
    """Below capacity the arrivals' decode rows slow the prediction down; past it no rank is promised."""
    from dataclasses import replace

    from matryoshka_lora.engine.budget.cost_model import MAX_STRETCH

    model = CostModel(coef=TRUE.copy())
    quiet = load()
    t_full = model.predict_step(StepFeatures(8, 0, 0, 0, 0, 8))  # ~ a full 8-row step, base
    busy = replace(quiet, decode_tokens_per_s=0.8 * 8 / t_full)
    flooded = replace(quiet, decode_tokens_per_s=3.0 * 8 / t_full)
    at = {
        name: model.predict_latency(snap, 2, 20, 32, 8)
        for name, snap in (("quiet", quiet), ("busy", busy), ("flooded", flooded))
    }
    assert at["quiet"] < at["busy"] < at["flooded"]
    assert at["flooded"] >= MAX_STRETCH * at["quiet"]
    budget = 3 * at["quiet"]  # ample when quiet
    assert model.choose_rank(quiet, 2, 20, 32, [1, 8, 64], budget)[:2] == (64, True)
    assert model.choose_rank(flooded, 2, 20, 32, [1, 8, 64], budget)[:2] == (1, False)
    parts = model.predict_parts(flooded, 2, 20, 32, 1)
    assert parts.rows is None  # saturated
    assert parts.total == pytest.approx(MAX_STRETCH * (parts.queue + parts.prefill + parts.decode))


def test_the_parts_add_up_to_the_prediction():
    from dataclasses import replace

    model = CostModel(coef=TRUE.copy())
    snap = replace(load(num_running=4, num_waiting=2), prefill_share=0.3, decode_tokens_per_s=50.0)
    parts = model.predict_parts(snap, 2, 20, 32, 8)
    assert parts.rows is not None and parts.stretch > 1.0 and parts.prefill > 0 and parts.decode > 0
    assert parts.total == pytest.approx(parts.queue + (parts.prefill + parts.decode) * parts.stretch)
    assert model.predict_latency(snap, 2, 20, 32, 8) == parts.total
    assert "stretch" in parts.describe()


@pytest.mark.parametrize(
    "num_running, mean_remaining, sustained, expected",
    [
        (0, 0.0, 4.0, 3.0),  # quiet: itself and the arrivals growing towards 4 rows, half of them on average
        (4, 31.5, 0.0, 3.0),  # four running, each gone halfway through its 63 steps, nothing arriving
        (4, 200.0, 2.0, 6.0),  # they outlast it: all four throughout
        (30, 200.0, 8.0, 32.0),  # never more than max_num_seqs
    ],
)
def test_mean_rows_over_a_requests_life(num_running, mean_remaining, sustained, expected):
    from dataclasses import replace

    snap = replace(load(num_running=num_running, max_num_seqs=32), mean_remaining=mean_remaining)
    assert CostModel.mean_rows(snap, 63, sustained) == pytest.approx(expected)


def test_a_high_rank_only_with_headroom_for_the_next_request():
    """Rank 64 fits this request, but a next one like it would then miss at rank 1: it gets the highest rank
    that leaves that room; with room to spare it gets 64."""
    from matryoshka_lora.engine.budget.cost_model import with_request

    model = CostModel(coef=TRUE.copy())
    snap = load(num_running=6, max_num_seqs=16)
    ranks = [1, 2, 4, 8, 16, 32, 64]
    after = {r: model.predict_latency(with_request(snap, 0, 64, 32, r), 0, 64, 32, 1) for r in ranks}
    assert after[1] < after[64]  # a rank-64 neighbour slows the next request
    budget = (after[1] + after[64]) / 2
    assert model.predict_latency(snap, 0, 64, 32, 64) <= budget  # rank 64 fits this request
    rank, met, _, _ = model.choose_rank(snap, 0, 64, 32, ranks, budget, margin=1.0)
    assert met and rank < 64 and after[rank] <= budget
    assert model.choose_rank(snap, 0, 64, 32, ranks, 10 * after[64], margin=1.0)[0] == 64
    assert CostModel(coef=TRUE.copy(), headroom=False).choose_rank(snap, 0, 64, 32, ranks, budget, margin=1.0)[0] == 64


def test_with_request_adds_it_to_the_active_set_or_the_queue():
    from matryoshka_lora.engine.budget.cost_model import with_request

    snap = load(num_running=4, max_num_seqs=8)
    joined = with_request(snap, 0, 20, 32, 64)
    assert (joined.num_admitted, joined.num_waiting) == (1, 1)
    assert dict(joined.adapters)[0] == (8, 8, 64) and joined.pending_prompts[-1].num_left == 20
    full = with_request(load(num_running=8, max_num_seqs=8), 0, 20, 32, 64)
    assert (full.num_admitted, full.num_waiting, full.adapters) == (0, 1, load(num_running=8).adapters)
