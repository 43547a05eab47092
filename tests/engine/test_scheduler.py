"""Scheduler: decode first, chunked prefill within the token budget, round-robin admission over tenants."""

from __future__ import annotations

import pytest

from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.scheduler import Scheduler
from matryoshka_lora.engine.sequence import Sequence
from matryoshka_lora.engine.weights import ModelSpec
from matryoshka_lora.errors import QueueFullError
from matryoshka_lora.types import GenerationRequest, SamplingParams

from .engine_support import bare_sequence

SPEC = ModelSpec(1, 8, 2, 1, 4, 16, 32, 1e-5, 64)


def seq(tenant: str, i: int, prompt_len: int = 3) -> Sequence:
    req = GenerationRequest(
        f"{tenant}-{i}", tuple(range(1, prompt_len + 1)), SamplingParams(max_tokens=4), tenant=tenant
    )
    return bare_sequence(req)


def admitted_order(arrivals: list[str], max_num_seqs: int) -> list[str]:
    sched = Scheduler(KVCache(SPEC, max_num_seqs, 16), max_num_batched_tokens=1000, max_queue_len=100)
    counts: dict[str, int] = {}
    for tenant in arrivals:
        counts[tenant] = counts.get(tenant, 0) + 1
        sched.add(seq(tenant, counts[tenant]))
    return [s.request_id for s, _ in sched.schedule()]


@pytest.mark.parametrize(
    "arrivals, max_num_seqs, expected",
    [
        # a flood from A cannot starve B and C: admission alternates between tenants
        (["A"] * 5 + ["B", "C"], 3, ["A-1", "B-1", "C-1"]),
        (["A"] * 5 + ["B"], 4, ["A-1", "B-1", "A-2", "A-3"]),
        (["A", "A", "B", "B"], 4, ["A-1", "B-1", "A-2", "B-2"]),
        (["B", "A", "A", "A"], 2, ["B-1", "A-1"]),
        (["A"] * 3, 5, ["A-1", "A-2", "A-3"]),
    ],
)
def test_round_robin_admission(arrivals, max_num_seqs, expected):
    assert admitted_order(arrivals, max_num_seqs) == expected


def test_turn_order_persists_across_steps():
    """Slots free one at a time: admissions keep alternating between tenants across steps."""
    sched = Scheduler(KVCache(SPEC, 2, 16), max_num_batched_tokens=1000, max_queue_len=100)
    for i in range(3):
        sched.add(seq("A", i))
    for i in range(2):
        sched.add(seq("B", i))
    order = [s.request_id for s, _ in sched.schedule()]
    while sched.running:
        sched.remove(sched.running[0])  # the oldest finishes, one slot frees
        order += [s.request_id for s, _ in sched.schedule() if s.num_computed == 0 and s.request_id not in order]
    assert order == ["A-0", "B-0", "A-1", "B-1", "A-2"]


@pytest.mark.parametrize(
    "budget, prompt_lens, expected",
    [
        (4, [10], [4]),  # chunked prefill
        (6, [3, 5], [3, 3]),  # second prompt gets the rest of the budget
        (100, [3, 5], [3, 5]),
    ],
)
def test_token_budget_chunks_prefill(budget, prompt_lens, expected):
    sched = Scheduler(KVCache(SPEC, 4, 16), max_num_batched_tokens=budget, max_queue_len=100)
    for i, n in enumerate(prompt_lens):
        sched.add(seq("A", i, n))
    assert [n for _, n in sched.schedule()] == expected


def test_decode_before_prefill_and_bounded_queue():
    sched = Scheduler(KVCache(SPEC, 2, 16), max_num_batched_tokens=3, max_queue_len=2)
    a, b = seq("A", 0, 3), seq("B", 0, 6)
    sched.add(a)
    ((s, n),) = sched.schedule()
    s.num_computed += n
    s.token_ids.append(9)  # sampled
    sched.add(b)
    work = sched.schedule()
    assert [(w.request_id, n) for w, n in work] == [("A-0", 1), ("B-0", 2)]
    sched.add(seq("C", 0))
    sched.add(seq("C", 1))
    with pytest.raises(QueueFullError):
        sched.add(seq("C", 2))


def test_remove_frees_slot_and_waiting_entry():
    kv = KVCache(SPEC, 1, 16)
    sched = Scheduler(kv, max_num_batched_tokens=100, max_queue_len=10)
    a, b = seq("A", 0), seq("B", 0)
    sched.add(a), sched.add(b)
    sched.schedule()
    assert kv.num_free_slots == 0 and sched.num_waiting == 1
    sched.remove(b)
    sched.remove(a)
    assert kv.num_free_slots == 1 and sched.num_waiting == 0 and not sched.has_work()
