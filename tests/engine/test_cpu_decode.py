"""cpu_decode.DecodeLayers: a decode-only step's layers in one C call give llama.forward's logits bit for bit,
on every weight format, for the base model, one LoRA and mixed adapters and ranks; other steps are not taken."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from matryoshka_lora.engine.adapter_slots import GROUP_MEMBERS, fuse_group
from matryoshka_lora.engine.bf16_linear import SplitLinear, bf16_linear_supported
from matryoshka_lora.engine.model_runner import StepItem

FORMATS = [
    "float32",
    "gguf",
    pytest.param("gguf+bf16", marks=pytest.mark.skipif(not bf16_linear_supported(), reason="no bf16 linear here")),
]
# (adapter, rank) of each decode row; "a": float32 panels on every group, "b": bfloat16 panels, no o_proj
STEPS = {
    "one user, base": [(None, 0)],
    "one user, LoRA": [("a", 8)],
    "one user, bf16 LoRA": [("b", 4)],
    "mixed": [(None, 0), ("a", 1), ("a", 8), ("b", 3), ("b", 3), (None, 0)],
    "14 sequences": [(None, 0)] * 4 + [("a", 2)] * 5 + [("b", 8)] * 5,  # gguf+bf16: bf16 in llama.forward
    "24 sequences": [(None, 0)] * 6 + [("a", 4)] * 9 + [("b", 1)] * 9,  # on AMX: two row tiles; else not taken
}
R_MAX = 8


def fused_adapter(spec, pack_lora, seed: int, bf16: bool, skip=()):
    """Random weights large enough to move the logits, fused and packed per layer as the engine installs them."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(spec.num_layers):
        layer = {}
        for group, members in GROUP_MEMBERS.items():
            if group in skip:
                continue
            weights = {}
            for m in members:
                i, o = spec.module_shape(m)
                a, b = torch.randn(i, R_MAX, generator=gen) * i**-0.5, torch.randn(R_MAX, o, generator=gen) * 0.1
                weights[m] = (a.bfloat16().float(), b.bfloat16().float()) if bf16 else (a, b)
            layer[group] = pack_lora(fuse_group(spec, group, weights, R_MAX))
        layers.append(layer)
    return layers


@pytest.fixture
def engine_on(gguf_model_dir, c_ops):
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine

    def make(weight_format, kv_cache_dtype="auto"):
        config = EngineConfig(
            model=str(gguf_model_dir),
            max_num_seqs=24,
            max_model_len=64,
            warmup=False,
            weight_format=weight_format,
            kv_cache_dtype=kv_cache_dtype,
        )
        engine = LLMEngine(config)
        manifest = SimpleNamespace(r_max=R_MAX, train_ranks=(1, 2, 4, 8), scaling="none", alpha=1.0)
        pack = engine.runner.ops.pack_lora
        spec = engine.weights.spec
        entries = {
            "a": engine.adapters.install("a", manifest, "", fused_adapter(spec, pack, 1, bf16=False)),
            "b": engine.adapters.install("b", manifest, "", fused_adapter(spec, pack, 2, bf16=True, skip=("o",))),
        }
        assert engine.adapters.table[0]["qkv"][entries["b"].slot].bf16
        return engine, entries

    return make


def decode_items(engine, entries, rows):
    """Prefill one sequence per row (through llama.forward), then the items of their next decode step."""
    gen = torch.Generator().manual_seed(7)
    items = []
    for name, rank in rows:
        prompt = torch.randint(3, 100, (6,), generator=gen).tolist()
        entry = entries.get(name)
        adapter = (entry.slot, rank, entry.scale(rank)) if entry else (-1, 0, 0.0)
        slot = engine.kv.allocate()
        engine.runner.run(engine.runner.prepare([StepItem(prompt[:-1], slot, 0, False, *adapter)]))
        items.append(StepItem(prompt[-1:], slot, len(prompt) - 1, True, *adapter))
    return items


@contextlib.contextmanager
def narrow_linears_only(engine):
    """Every SplitLinear of the engine on its narrow side whatever the row count, while open."""
    splits = [lin for lw in engine.weights.layers for lin in (lw.qkv, lw.o, lw.gate_up, lw.down)]
    splits = [lin for lin in splits + [engine.weights.lm_head] if isinstance(lin, SplitLinear)]
    saved = [lin.min_rows for lin in splits]
    for lin in splits:
        lin.min_rows = 1 << 30
    try:
        yield
    finally:
        for lin, min_rows in zip(splits, saved):
            lin.min_rows = min_rows


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weight_format", FORMATS)
@pytest.mark.parametrize("step", list(STEPS))
def test_decode_layers_give_llama_forwards_bits(engine_on, weight_format, step, kv_cache_dtype):
    engine, entries = engine_on(weight_format, kv_cache_dtype)
    assert engine.kv.cache.dtype == getattr(torch, kv_cache_dtype)
    runner = engine.runner
    assert runner.decode_layers is not None
    items = decode_items(engine, entries, STEPS[step])
    batch = runner.prepare(items)
    max_rows = runner.decode_layers.max_rows
    if max_rows is not None and len(items) > max_rows:  # gguf+bf16 without int8 rows (no VNNI)
        assert not runner.decode_layers.takes(batch.meta, batch.num_tokens)
        return
    assert runner.decode_layers.takes(batch.meta, batch.num_tokens)
    cache_before = engine.kv.cache.clone()
    fused_idx, fused = runner.run(batch)
    fused_cache = engine.kv.cache.clone()
    engine.kv.cache.copy_(cache_before)
    layers, runner.decode_layers = runner.decode_layers, None
    with narrow_linears_only(engine):  # llama.forward on the linears the C loop reads, the same C kernels
        idx, reference = runner.run(runner.prepare(items))
    runner.decode_layers = layers
    assert fused_idx == idx
    assert torch.equal(fused, reference)
    assert torch.equal(fused_cache, engine.kv.cache)  # the same K/V written
    base = [i for i, (name, _) in enumerate(STEPS[step]) if name is None]
    if len(base) < len(items):  # the adapters move the logits, so skipping a LoRA group would show
        base_items = [StepItem(it.token_ids, it.slot, it.position, True) for it in items]
        _, base_logits = runner.run(runner.prepare(base_items))
        moved = [j for j in range(len(items)) if j not in base]
        assert not torch.allclose(fused[moved], base_logits[moved], atol=1e-3)


@pytest.mark.parametrize("weight_format", FORMATS)
def test_prefill_and_wide_steps_run_llama_forward(engine_on, weight_format):
    from matryoshka_lora.engine.bf16_linear import MIN_WIDE_ROWS

    engine, entries = engine_on(weight_format)
    runner = engine.runner
    prefill = runner.prepare([StepItem([5, 6, 7], engine.kv.allocate(), 0, True)])
    assert not runner.decode_layers.takes(prefill.meta, prefill.num_tokens)
    items = decode_items(engine, entries, [(None, 0)])
    mixed = runner.prepare(items + [StepItem([5, 6, 7], engine.kv.allocate(), 0, True)])
    assert not runner.decode_layers.takes(mixed.meta, mixed.num_tokens)
    int8_rows = runner.ops.lib.ml_blocks_max_int8_rows()
    expected = max(MIN_WIDE_ROWS - 1, int8_rows) if weight_format == "gguf+bf16" else None
    assert runner.decode_layers.max_rows == expected


def test_no_decode_layers_on_torch_ops(make_engine):
    engine = make_engine(fused_kernels=False)
    assert engine.runner.decode_layers is None


def test_silu_mul_equals_torch(c_ops):
    from matryoshka_lora.engine.torch_ops import TorchOps

    gen = torch.Generator().manual_seed(0)
    gu = torch.randn(7, 2 * 96, generator=gen) * 6
    gu[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])
    torch.testing.assert_close(c_ops.silu_mul(gu), TorchOps().silu_mul(gu), rtol=2e-6, atol=1e-7)
    strided = torch.randn(5, 3 * 96, generator=gen)[:, : 2 * 96]
    torch.testing.assert_close(c_ops.silu_mul(strided), TorchOps().silu_mul(strided), rtol=2e-6, atol=1e-7)


def test_a_slot_refilled_with_other_weights_gets_its_own_table_and_the_old_are_freed(engine_on):
    import gc
    import weakref

    engine, entries = engine_on("gguf")
    runner = engine.runner
    items = decode_items(engine, entries, [("a", 8)])
    runner.run(runner.prepare(items))  # caches slot a's table
    slot = entries["a"].slot
    old = weakref.ref(engine.adapters.table[0]["qkv"][slot])
    engine.adapters.unregister("a")
    engine.adapters.free_slot(slot)
    gc.collect()
    assert old() is None  # the cached table does not keep an unloaded adapter's weights alive
    manifest = SimpleNamespace(r_max=R_MAX, train_ranks=(1, 2, 4, 8), scaling="none", alpha=1.0)
    spec, pack = engine.weights.spec, runner.ops.pack_lora
    assert engine.adapters.install("c", manifest, "", fused_adapter(spec, pack, 9, bf16=False)).slot == slot
    cache = engine.kv.cache.clone()
    _, fused = runner.run(runner.prepare(items))
    engine.kv.cache.copy_(cache)
    layers, runner.decode_layers = runner.decode_layers, None
    _, reference = runner.run(runner.prepare(items))
    runner.decode_layers = layers
    assert torch.equal(fused, reference)
