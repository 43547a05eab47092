"""Warm-up: run synthetic steps over a grid of batch sizes, ranks and contexts, and fit the cost model.

Rank costs need LoRA weights: a temporary random adapter at r_max (the largest loaded, else 64) is
installed for the warm-up and removed after. The KV contents are irrelevant to timing, so the steps
write into freshly allocated slots that are freed at the end.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import torch

from matryoshka_lora.engine.adapter_slots import random_fused_adapter
from matryoshka_lora.engine.engine import LLMEngine, step_features
from matryoshka_lora.engine.model_runner import StepItem

log = logging.getLogger(__name__)

WARMUP_ADAPTER = "__warmup__"
DEFAULT_WARMUP_R_MAX = 64


def warmup_grid(max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int, r_max: int):
    """(kind, batch size or prompt length, rank, context) cases; every feature varies independently."""
    ranks = sorted({0, max(1, r_max // 8), r_max})
    batches = sorted({b for b in (1, 4, 16, 32) if b <= max_num_seqs} | {min(4, max_num_seqs)})
    contexts = sorted({min(32, max_model_len - 1), min(256, max_model_len - 1)})
    cases = [("decode", b, r, c) for b in batches for r in ranks for c in contexts]
    chunks = sorted({min(n, max_num_batched_tokens, max_model_len - 1) for n in (16, 64, 256)})
    cases += [("prefill", n, r, 0) for n in chunks for r in (0, r_max)]
    return cases


def _items(kind: str, size: int, rank: int, context: int, slots: list[int], adapter_slot: int, scale: float):
    a_slot = adapter_slot if rank > 0 else -1
    if kind == "prefill":
        return [StepItem(list(range(3, 3 + size)), slots[0], 0, True, a_slot, rank, scale)]
    # decode: half the batch at `rank`, half at rank 1, so segments vary too
    items = []
    for i in range(size):
        r = rank if i % 2 == 0 or rank == 0 else 1
        items.append(StepItem([5], slots[i], context - 1, True, a_slot, r, scale))
    return items


@torch.inference_mode()
def warmup(engine: LLMEngine, repeats: int = 1) -> None:
    """Time the grid (first run of each case discarded) and fit `engine.cost_model`."""
    started = time.perf_counter()
    with engine.lock:
        loaded = sorted(engine.adapters.entries.values(), key=lambda e: e.r_max)
        if loaded:  # time the largest loaded adapter
            entry, temporary = loaded[-1], False
        else:
            manifest = SimpleNamespace(r_max=DEFAULT_WARMUP_R_MAX, train_ranks=(DEFAULT_WARMUP_R_MAX,), scaling="none", alpha=1.0)
            fused = random_fused_adapter(engine.weights.spec, DEFAULT_WARMUP_R_MAX)
            entry, temporary = engine.adapters.install(WARMUP_ADAPTER, manifest, "", fused), True
        r_max = entry.r_max
        slots = [engine.kv.allocate() for _ in range(min(engine.kv.num_free_slots, engine.config.max_num_seqs))]
    samples = []
    try:
        for kind, size, rank, context in warmup_grid(len(slots), engine.max_model_len, engine.config.max_num_batched_tokens, r_max):
            items = _items(kind, size, rank, context, slots, entry.slot, 1.0)
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                engine.runner.execute(items)
                if i > 0:
                    samples.append((step_features(items), time.perf_counter() - t0))
        engine.cost_model.fit(samples)
    finally:
        with engine.lock:
            for slot in slots:
                engine.kv.free(slot)
            if temporary:
                engine.adapters.unregister(WARMUP_ADAPTER)
                engine.adapters.free_slot(entry.slot)
    log.info("warm-up: %d timed steps in %.1f s", len(samples), time.perf_counter() - started)
