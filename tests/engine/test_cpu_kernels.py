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
    torch.testing.assert_close(c_ops.rms_norm(x, weight, 1e-5), TorchOps().rms_norm(x, weight, 1e-5), atol=ATOL, rtol=1e-5)


def _step(spec: ModelSpec, max_num_seqs: int, max_model_len: int, items: list[tuple[int, int, int]], seed: int):
    """A step of items (slot, first position, num tokens) on a cache with random contents: (qkv, meta, kv)."""
    gen = torch.Generator().manual_seed(seed)
    kv = KVCache(spec, max_num_seqs, max_model_len)
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
        positions=torch.tensor(positions), slots=torch.tensor(slots), cache_rows=kv.write_rows(slots, positions),
        cos=torch.cat([angles.cos()] * 2, dim=-1), sin=torch.cat([angles.sin()] * 2, dim=-1), prefills=[],
        decode=build_decode_meta(dec_rows, dec_slots, dec_lens) if dec_rows else None,
        sample_rows=torch.arange(num_tokens))
    qkv = torch.randn(num_tokens, spec.q_size + 2 * spec.kv_size, generator=gen)
    return qkv, meta, kv


SPECS = {  # (num_heads, num_kv_heads, head_dim): GQA groups of 2 and 3 (SmolLM2's 9/3/64), none
    "gqa2": (4, 2, 8), "smollm2": (9, 3, 64), "mha": (4, 4, 16),
}
STEPS = {  # (slot, first position, num tokens) per item: decode rows (n = 1) and prefill chunks
    "decode, scattered slots": [(5, 9, 1), (1, 0, 1), (3, 30, 1)],
    "decode at the last position": [(0, 31, 1), (2, 4, 1)],
    "prefill + decode": [(2, 0, 6), (0, 12, 1), (1, 3, 4), (3, 7, 1)],
}


@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("step", STEPS, ids=list(STEPS))
@pytest.mark.parametrize("shape", SPECS, ids=list(SPECS))
def test_rope_cache_and_decode_attention_equal_torch(c_ops, shape, step, num_threads):
    """At any OpenMP thread count (3: more threads than this machine's cores, an uneven split)."""
    heads, kv_heads, head_dim = SPECS[shape]
    spec = ModelSpec(1, heads * head_dim, heads, kv_heads, head_dim, 64, 32, 1e-5, 32)
    results = []
    for ops in (TorchOps(), cpu_kernels.CKernelOps(c_ops.lib, num_threads)):
        qkv, meta, kv = _step(spec, 6, 32, STEPS[step], seed=7)
        q, k, v = ops.rope_and_cache(qkv, spec, 0, meta, kv)
        out = torch.zeros(q.shape)
        if meta.decode is not None:
            ops.decode_attention(q, 0, meta, kv, out)
        results.append((q.clone(), k.clone(), v.clone(), kv.cache.clone(), out))
    for name, want, got in zip(("q", "k", "v", "cache", "decode attention"), results[0], results[1]):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert results[1][4].abs().sum() > 0 or not any(n == 1 for _, _, n in STEPS[step])


SMOLLM2 = ModelSpec(1, 576, 9, 3, 64, 1536, 32, 1e-5, 32)


@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("row_ranks", [[64] * 5, [1, 8, 8, 32, 64], [2, 3, 1]], ids=["uniform", "masked", "small"])
def test_lora_group_at_every_thread_count_equals_torch(c_ops, group, row_ranks):
    """SmolLM2's shapes at r_max 64, above PARALLEL_MIN_FLOATS (the columns split across threads) and
    below it ("small": one thread): every thread count gives the torch op's result."""
    from matryoshka_lora.engine.adapter_slots import (
        GROUP_MEMBERS,
        fuse_group,
        member_columns,
    )
    from matryoshka_lora.engine.lora_batch import build_groups, build_segments
    from matryoshka_lora.engine.lora_ops import lora_grouped_

    gen = torch.Generator().manual_seed(len(row_ranks))
    members = {}
    for name in GROUP_MEMBERS[group]:
        i, o = SMOLLM2.module_shape(name)
        members[name] = (torch.randn(i, 64, generator=gen), torch.randn(64, o, generator=gen) * 0.1)
    fused = [fuse_group(SMOLLM2, group, members, 64)]
    in_f = SMOLLM2.module_shape(GROUP_MEMBERS[group][0])[0]
    out_f = max(c1 for _, c1 in member_columns(SMOLLM2, group).values())
    x = torch.randn(len(row_ranks), in_f, generator=gen)
    groups = build_groups(build_segments([(t, t + 1, 0, r, 0.5 / r) for t, r in enumerate(row_ranks)]))
    want = lora_grouped_(torch.zeros(len(row_ranks), out_f), x, groups, fused)
    got = [cpu_kernels.CKernelOps(c_ops.lib, n).lora_grouped_(torch.zeros_like(want), x, groups, fused)
           for n in (1, 2, 3)]
    for result in got:
        torch.testing.assert_close(result, want, atol=1e-3, rtol=1e-4)


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
