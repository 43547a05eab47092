"""Warm-up: run synthetic steps over a grid of batch sizes, ranks, adapters and contexts, and fit the cost model.

The engine lends the scratch state (`LLMEngine.scratch`: free KV slots and the adapters to time, see
adapter_slots.install_warmup_adapters) and times a step as its loop does (`LLMEngine.time_step`:
prepare + run). Each case runs `repeats + 1` times; the first run is dropped and the median of the rest is the
sample (a 2-core machine's timings are noisy). The KV contents are irrelevant to timing, so the steps
write into freshly allocated slots that are freed at the end.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from matryoshka_lora.engine.budget.cost_model import CostModel
from matryoshka_lora.engine.budget.step_features import step_features
from matryoshka_lora.engine.model_runner import StepItem

log = logging.getLogger(__name__)


def warmup_grid(max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int, r_max: int, max_adapters: int = 2):
    """(kind, batch size or prompt length, rank, context, adapters) cases; every feature varies independently."""
    ranks = sorted({0, max(1, r_max // 8), r_max})
    batches = sorted({b for b in (1, 4, 16, 32) if b <= max_num_seqs} | {min(4, max_num_seqs)})
    contexts = sorted({min(32, max_model_len - 1), min(256, max_model_len - 1)})
    adapter_counts = (1, 2) if max_adapters >= 2 else (1,)
    cases = [
        ("decode", b, r, c, a)
        for b in batches
        for r in ranks
        for c in contexts
        for a in adapter_counts
        if not (r == 0 and a == 2)
    ]
    chunks = sorted({min(n, max_num_batched_tokens, max_model_len - 1) for n in (16, 64, 256)})
    cases += [("prefill", n, r, 0, 1) for n in chunks for r in (0, r_max)]
    return cases


def _items(kind: str, size: int, rank: int, context: int, slots: list[int], adapter_slots: list[int]):
    if kind == "prefill":
        a_slot = adapter_slots[0] if rank > 0 else -1
        return [StepItem(list(range(3, 3 + size)), slots[0], 0, True, a_slot, rank, 1.0)]
    # decode: rows alternate between the adapters, and within each between `rank` and rank 1
    items = []
    for i in range(size):
        a_slot = adapter_slots[i % len(adapter_slots)] if rank > 0 else -1
        r = rank if (i // len(adapter_slots)) % 2 == 0 or rank == 0 else 1
        items.append(StepItem([5], slots[i], context - 1, True, a_slot, r, 1.0))
    return items


@torch.inference_mode()
def calibrate(engine, cost_model: CostModel, repeats: int = 3) -> None:
    """Time the grid on `engine` (an LLMEngine) and fit `cost_model`."""
    started = time.perf_counter()
    samples = []
    with engine.scratch() as (slots, entries):
        grid = warmup_grid(
            len(slots), engine.max_model_len, engine.config.max_num_batched_tokens, entries[0].r_max, len(entries)
        )
        for kind, size, rank, context, num_adapters in grid:
            items = _items(kind, size, rank, context, slots, [e.slot for e in entries[:num_adapters]])
            runs = [engine.time_step(items) for _ in range(repeats + 1)]
            lora_groups = runs[-1][0]
            features = step_features(items, lora_groups, cost_model.max_one_call_rows)
            samples.append((features, statistics.median(t for _, t in runs[1:])))
    cost_model.fit(samples)
    log.info("warm-up: %d cases x %d timed runs in %.1f s", len(samples), repeats, time.perf_counter() - started)
