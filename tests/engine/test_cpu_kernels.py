"""The fused C kernels equal the torch reference ops (torch_ops.TorchOps), and the engine falls back without them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from matryoshka_lora.engine import cpu_kernels
from matryoshka_lora.engine.attention import AttentionMeta, build_decode_meta
from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.torch_ops import TorchOps
from matryoshka_lora.engine.weights import ModelSpec

ATOL = 2e-5


@pytest.mark.parametrize("rows, dim, stride_pad", [(1, 8, 0), (16, 576, 0), (300, 64, 0), (5, 32, 96)])
def test_rms_norm_equals_torch(c_ops, rows, dim, stride_pad):
    """Row counts from one decode row to a prefill chunk; a row stride wider than the row (a column slice)."""
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, dim + stride_pad, generator=gen) * 3)[:, :dim]
    weight = torch.randn(dim, generator=gen)
    torch.testing.assert_close(
        c_ops.rms_norm(x, weight, 1e-5), TorchOps().rms_norm(x, weight, 1e-5), atol=ATOL, rtol=1e-5
    )


def _step(
    spec: ModelSpec,
    max_num_seqs: int,
    max_model_len: int,
    items: list[tuple[int, int, int]],
    seed: int,
    cache_dtype: torch.dtype = torch.float32,
):
    """A step of items (slot, first position, num tokens) on a cache with random contents: (qkv, meta, kv)."""
    gen = torch.Generator().manual_seed(seed)
    kv = KVCache(spec, max_num_seqs, max_model_len, cache_dtype)
    kv.cache.copy_(torch.randn(kv.cache.shape, generator=gen))
    slots, positions, dec_rows, dec_slots, dec_lens = [], [], [], [], []
    for slot, start, n in items:
        if n == 1:
            dec_rows.append(len(slots)), dec_slots.append(slot), dec_lens.append(start + 1)
        slots += [slot] * n
        positions += range(start, start + n)
    num_tokens = len(slots)
    angles = torch.randn(num_tokens, 1, spec.head_dim // 2, generator=gen)
    meta = AttentionMeta(
        positions=torch.tensor(positions),
        slots=torch.tensor(slots),
        cache_rows=kv.write_rows(slots, positions),
        cos=torch.cat([angles.cos()] * 2, dim=-1),
        sin=torch.cat([angles.sin()] * 2, dim=-1),
        prefills=[],
        decode=build_decode_meta(dec_rows, dec_slots, dec_lens) if dec_rows else None,
        sample_rows=torch.arange(num_tokens),
    )
    qkv = torch.randn(num_tokens, spec.q_size + 2 * spec.kv_size, generator=gen)
    return qkv, meta, kv


SPECS = {  # (num_heads, num_kv_heads, head_dim): GQA groups of 2 and 3 (SmolLM2's 9/3/64), none
    "gqa2": (4, 2, 8),
    "smollm2": (9, 3, 64),
    "mha": (4, 4, 16),
}
STEPS = {  # (slot, first position, num tokens) per item: decode rows (n = 1) and prefill chunks
    "decode, scattered slots": [(5, 9, 1), (1, 0, 1), (3, 30, 1)],
    "decode at the last position": [(0, 31, 1), (2, 4, 1)],
    "prefill + decode": [(2, 0, 6), (0, 12, 1), (1, 3, 4), (3, 7, 1)],
}


def _logits(case: str) -> torch.Tensor:
    """[rows, vocab] logits for each argmax case."""
    gen = torch.Generator().manual_seed(0)
    if case == "random":
        return torch.randn(16, 49152, generator=gen)
    if case == "one-row":
        return torch.randn(1, 49152, generator=gen)
    if case == "short-rows":  # shorter than one vector, and a tail after the vectors
        return torch.randn(5, 37, generator=gen)
    if case == "ties":  # the max at several places: in lanes of one vector, across vectors, in the tail
        x = torch.randn(4, 100, generator=gen)
        x[0, [3, 7, 40]] = 9.0
        x[1, [17, 1]] = 9.0
        x[2, [99, 98]] = 9.0
        x[3] = 1.0
        return x
    if case == "infinities":
        x = torch.full((3, 50), -float("inf"))
        x[1, 20] = float("inf")
        x[2, [10, 45]] = float("inf")
        return x
    if case == "nan":  # torch counts a NaN as the max: its first NaN
        x = torch.randn(3, 64, generator=gen)
        x[0, 33] = float("nan")
        x[1, [5, 60]] = float("nan")
        x[2, 63] = float("nan")
        return x
    if case == "strided":  # rows of a wider buffer
        return torch.randn(6, 1000, generator=gen)[:, :900]
    raise ValueError(case)


@pytest.fixture(scope="module", params=["native", "no-avx512"])
def argmax_ops(request, c_ops):
    """The engine's C ops, and the same built without AVX-512 (the scalar loop)."""
    if request.param == "native":
        return c_ops
    return cpu_kernels.CKernelOps(cpu_kernels._load(cpu_kernels.build_library(("-mno-avx512f",))))


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("case", ["random", "one-row", "short-rows", "ties", "infinities", "nan", "strided"])
def test_argmax_rows_equals_torch(argmax_ops, case, num_threads):
    """ml_argmax_rows gives torch.argmax's index on every row: the first max, a NaN counting as the max."""
    logits = _logits(case)
    saved, argmax_ops.num_threads = argmax_ops.num_threads, num_threads
    try:
        assert argmax_ops.argmax_rows(logits) == TorchOps.argmax_rows(logits)
    finally:
        argmax_ops.num_threads = saved


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["float32-cache", "bf16-cache"])
@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("step", STEPS, ids=list(STEPS))
@pytest.mark.parametrize("shape", SPECS, ids=list(SPECS))
def test_rope_cache_and_decode_attention_equal_torch(c_ops, shape, step, num_threads, cache_dtype):
    """At any OpenMP thread count (3: more threads than this machine's cores, an uneven split), on a float32
    and on a bfloat16 cache (the same rounded values written: the caches equal bit for bit)."""
    heads, kv_heads, head_dim = SPECS[shape]
    spec = ModelSpec(1, heads * head_dim, heads, kv_heads, head_dim, 64, 32, 1e-5, 32)
    results = []
    for ops in (TorchOps(), cpu_kernels.CKernelOps(c_ops.lib, num_threads)):
        qkv, meta, kv = _step(spec, 6, 32, STEPS[step], seed=7, cache_dtype=cache_dtype)
        q, k, v = ops.rope_and_cache(qkv, spec, 0, meta, kv)
        out = torch.zeros(q.shape)
        if meta.decode is not None:
            ops.decode_attention(q, 0, meta, kv, out)
        results.append((q.clone(), k.clone(), v.clone(), kv.cache.clone(), out))
    for name, want, got in zip(("q", "k", "v", "cache", "decode attention"), results[0], results[1]):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert results[1][4].abs().sum() > 0 or not any(n == 1 for _, _, n in STEPS[step])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_kernels_share_torchs_openmp_runtime(c_ops):
    """One libgomp in the process: the kernels' threads are torch's pool, not a second one."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    assert len({line.split()[-1] for line in maps if "libgomp" in line}) <= 1


def test_load_step_ops_falls_back_without_a_compiler(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="matryoshka_lora.engine.cpu_kernels"):
        ops = cpu_kernels.load_step_ops()
    assert type(ops) is TorchOps
    assert "no C compiler" in caplog.text


@pytest.mark.parametrize("enabled, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_load_step_ops_off_or_not_float32_is_torch(enabled, dtype):
    assert type(cpu_kernels.load_step_ops(enabled, dtype)) is TorchOps


def test_build_is_cached_per_source(c_ops):
    first = cpu_kernels.build_library()
    assert cpu_kernels.build_library() == first and first.is_file()
