"""Warm-up: run synthetic steps over a grid of batch sizes, ranks, adapters and contexts, and fit the cost model.

Rank costs need LoRA weights: the largest loaded adapter is timed (so the fit sees the modules it
really targets), else a temporary random one at r_max 64 on every module. Its weights are also put in
a second, temporary slot (shared, not copied) so that steps with two adapters' groups are timed too.
Each case runs `repeats + 1` times; the first run is dropped and the median of the rest is the
sample (a 2-core machine's timings are noisy). The KV contents are irrelevant to timing, so the steps
write into freshly allocated slots that are freed at the end.
"""

from __future__ import annotations

import logging
import statistics
import time
from types import SimpleNamespace

import torch

from matryoshka_lora.engine.adapter_slots import random_fused_adapter
from matryoshka_lora.engine.engine import LLMEngine
from matryoshka_lora.engine.model_runner import StepItem
from matryoshka_lora.engine.step_features import step_features

log = logging.getLogger(__name__)

WARMUP_ADAPTER, WARMUP_TWIN = "__warmup__", "__warmup_twin__"
DEFAULT_WARMUP_R_MAX = 64


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


def _install_warmup_adapters(engine: LLMEngine):
    """(entries timed, names installed here): the largest loaded adapter (else a random one) and its twin."""
    loaded = sorted(engine.adapters.entries.values(), key=lambda e: e.r_max)
    installed = []
    if loaded:
        entry = loaded[-1]
    else:
        manifest = SimpleNamespace(
            r_max=DEFAULT_WARMUP_R_MAX, train_ranks=(DEFAULT_WARMUP_R_MAX,), scaling="none", alpha=1.0
        )
        fused = random_fused_adapter(engine.weights.spec, DEFAULT_WARMUP_R_MAX, engine.runner.ops.pack_lora)
        entry = engine.adapters.install(WARMUP_ADAPTER, manifest, "", fused)
        installed.append(entry)
    entries = [entry]
    if engine.adapters.num_free_slots > 0:
        weights = [
            {g: layer[g][entry.slot] for g in layer if layer[g][entry.slot] is not None}
            for layer in engine.adapters.table
        ]
        twin = engine.adapters.install(WARMUP_TWIN, entry.manifest, "", weights)
        entries.append(twin)
        installed.append(twin)
    return entries, installed


@torch.inference_mode()
def warmup(engine: LLMEngine, repeats: int = 3) -> None:
    """Time the grid and fit `engine.cost_model`."""
    started = time.perf_counter()
    with engine.lock:
        entries, installed = _install_warmup_adapters(engine)
        slots = [engine.kv.allocate() for _ in range(min(engine.kv.num_free_slots, engine.config.max_num_seqs))]
    samples = []
    try:
        grid = warmup_grid(
            len(slots), engine.max_model_len, engine.config.max_num_batched_tokens, entries[0].r_max, len(entries)
        )
        for kind, size, rank, context, num_adapters in grid:
            items = _items(kind, size, rank, context, slots, [e.slot for e in entries[:num_adapters]])
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                batch = engine.runner.prepare(items)  # timed as LLMEngine.step times it: prepare + run
                engine.runner.run(batch)
                times.append(time.perf_counter() - t0)
            samples.append((step_features(items, batch.lora_groups), statistics.median(times[1:])))
        engine.cost_model.fit(samples)
    finally:
        with engine.lock:
            for slot in slots:
                engine.kv.free(slot)
            for entry in installed:
                engine.adapters.unregister(entry.name)
                engine.adapters.free_slot(entry.slot)
    log.info("warm-up: %d cases x %d timed runs in %.1f s", len(samples), repeats, time.perf_counter() - started)
