"""cpu_gemm.c with the AVX2 micro-kernel and the portable one: PanelLinear (ml_linear) == nn.Linear's math
(every row-tile remainder, partial panels, bias, any thread count), and the C LoRA group (ml_lora_group)
== the torch op at SmolLM2's shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matryoshka_lora.engine import cpu_kernels, lora_panels
from matryoshka_lora.engine.cpu_linear import PanelLinear, pack_panels
from matryoshka_lora.engine.weights import ModelSpec

SHAPES = {  # (out, in): below the threading threshold, a partial last panel, SmolLM2's qkv and down
    "tiny": (5, 3),
    "partial-panel": (40, 24),
    "qkv": (960, 576),
    "down": (576, 1536),
}
ROWS = [0, 1, 5, 6, 7, 16, 61]  # MR = 6: every remainder of a row tile, and several tiles


@pytest.fixture(scope="module", params=["avx2-or-native", "portable"])
def lib(request, c_ops):
    """The kernels as the engine builds them, and with the portable micro-kernel; where the first builds,
    the second must too (a failure here is a bug in the portable path, not a missing compiler)."""
    if request.param == "avx2-or-native":
        return c_ops.lib
    return cpu_kernels._load(cpu_kernels.build_library(("-DML_PORTABLE_GEMM",)))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_panel_linear_equals_linear(lib, shape, rows, with_bias):
    out_f, in_f = SHAPES[shape]
    gen = torch.Generator().manual_seed(rows * 7 + out_f)
    weight = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    bias = torch.randn(out_f, generator=gen) if with_bias else None
    x = torch.randn(rows, in_f, generator=gen)
    got = PanelLinear(lib, weight, bias, lambda: 2)(x)
    torch.testing.assert_close(got, F.linear(x, weight, bias), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_panel_linear_at_any_thread_count(c_ops, num_threads):
    gen = torch.Generator().manual_seed(num_threads)
    weight, x = torch.randn(100, 64, generator=gen), torch.randn(9, 64, generator=gen)
    big = torch.randn(700, 300, generator=gen)  # above the threading threshold: the panels split
    for w in (weight, big):
        xs = x if w is weight else torch.randn(9, 300, generator=gen)
        got = PanelLinear(c_ops.lib, w, None, lambda: num_threads)(xs)
        torch.testing.assert_close(got, F.linear(xs, w), atol=1e-4, rtol=1e-4)


def test_panel_linear_takes_strided_rows(c_ops):
    """A column slice (row stride > in_features), and a transposed view (made contiguous first)."""
    weight = torch.randn(48, 32)
    wide = torch.randn(7, 50)[:, 3:35]
    layer = PanelLinear(c_ops.lib, weight, None, lambda: 2)
    torch.testing.assert_close(layer(wide), F.linear(wide, weight), atol=1e-4, rtol=1e-4)
    transposed = torch.randn(32, 7).t()
    torch.testing.assert_close(layer(transposed), F.linear(transposed, weight), atol=1e-4, rtol=1e-4)


def test_pack_panels_layout():
    """panels[p, k, j] = W[16 p + j, k], zero past the last output."""
    weight = torch.arange(20 * 3, dtype=torch.float32).reshape(20, 3)
    panels = pack_panels(weight)
    assert panels.shape == (2, 3, 16)
    assert panels[1, 2, 3] == weight[19, 2] and panels[0, 0, 5] == weight[5, 0]
    assert torch.all(panels[1, :, 4:] == 0)


def test_panel_linear_is_float32_only(c_ops):
    with pytest.raises(TypeError, match="float32"):
        PanelLinear(c_ops.lib, torch.randn(4, 4, dtype=torch.float64), None, lambda: 1)
    assert type(c_ops.pack_linear(torch.randn(4, 4, dtype=torch.float64))).__name__ == "PackedLinear"
    assert isinstance(c_ops.pack_linear(torch.randn(4, 4)), PanelLinear)


SMOLLM2 = ModelSpec(1, 576, 9, 3, 64, 1536, 32, 1e-5, 32)


@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize(
    "row_ranks",
    [[64] * 5, [1, 8, 8, 32, 64], [2, 3, 1], [5] * 16, [7] * 40, [1] * 100, [8] * 300],
    ids=["uniform", "masked", "small", "16-rows-rank-5", "40-rows-rank-7", "100-rows-rank-1", "300-rows-rank-8"],
)
def test_lora_group_at_every_thread_count_equals_torch(lib, group, row_ranks):
    """SmolLM2's shapes at r_max 64: above PARALLEL_MIN_WEIGHTS (blocks split across threads) and below
    it ("small": one thread); widths that end in a partial 16-column block (ranks 5, 7; k * r < 16);
    prefill-sized groups whose shrink has fewer blocks than threads (its rows split across them).
    Every thread count gives the torch op's result."""
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
    panels = [lora_panels.PanelLoRA.pack(w) for w in fused]
    for n in (1, 2, 3):  # every group in C, however wide
        got = cpu_kernels.CKernelOps(lib, n, None).lora_grouped_(torch.zeros_like(want), x, groups, panels)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
def test_panels_unpack_to_the_fused_weights(group, bf16):
    """PanelLoRA.fused() is pack's inverse, bit for bit, for float32 and bfloat16 adapters (the MKL path
    of wide groups reads it)."""
    from matryoshka_lora.engine.adapter_slots import GROUP_MEMBERS, fuse_group

    gen = torch.Generator().manual_seed(3)
    members = {}
    for name in GROUP_MEMBERS[group]:
        i, o = SMOLLM2.module_shape(name)
        a, b = torch.randn(i, 24, generator=gen), torch.randn(24, o, generator=gen)
        members[name] = (a.bfloat16().float(), b.bfloat16().float()) if bf16 else (a, b)
    fused = fuse_group(SMOLLM2, group, members, 24)
    panels = lora_panels.PanelLoRA.pack(fused)
    assert panels.bf16 == bf16
    back = panels.fused()
    assert back is panels.fused()  # unpacked once
    assert back.lora_A.dtype == torch.float32 and torch.equal(back.lora_A, fused.lora_A)
    for (b, c0, c1), (want, w0, w1) in zip(back.lora_B, fused.lora_B):
        assert (c0, c1) == (w0, w1) and torch.equal(b, want)


@pytest.mark.parametrize(
    "segments",
    [[(0, 300, 0, 8)], [(0, 5, 0, 3), (5, 305, 1, 32), (305, 309, 1, 64)], [(0, 260, 1, 1), (260, 520, 0, 64)]],
    ids=["one-wide", "narrow-wide-narrow", "two-wide"],
)
def test_wide_groups_on_mkl_equal_the_c_kernel(c_ops, segments):
    """Groups of one rank from min_mkl_lora_rows rows run lora_ops.lora_grouped_ on PanelLoRA.fused(), the
    others in C, in one call; each row's result equals the all-C one to float32 rounding."""
    from matryoshka_lora.engine.adapter_slots import GROUP_MEMBERS, fuse_group, member_columns
    from matryoshka_lora.engine.lora_batch import build_groups, build_segments

    gen = torch.Generator().manual_seed(len(segments))
    panels = []
    for _ in range(2):  # two adapters, slots 0 and 1
        members = {}
        for name in GROUP_MEMBERS["qkv"]:
            i, o = SMOLLM2.module_shape(name)
            members[name] = (torch.randn(i, 64, generator=gen), torch.randn(64, o, generator=gen) * 0.1)
        panels.append(lora_panels.PanelLoRA.pack(fuse_group(SMOLLM2, "qkv", members, 64)))
    rows = segments[-1][1]
    out_f = max(c1 for _, c1 in member_columns(SMOLLM2, "qkv").values())
    x = torch.randn(rows, SMOLLM2.hidden_size, generator=gen)
    groups = build_groups(build_segments([(s, e, slot, r, 0.5 / r) for s, e, slot, r in segments]))
    on_c = cpu_kernels.CKernelOps(c_ops.lib, 2, None)
    mixed = cpu_kernels.CKernelOps(c_ops.lib, 2, 256)
    want = on_c.lora_grouped_(torch.zeros(rows, out_f), x, groups, panels)
    got = mixed.lora_grouped_(torch.zeros(rows, out_f), x, groups, panels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert all(
        bool(p._fused) == any(g.slot == i and g.end - g.start >= 256 for g in groups) for i, p in enumerate(panels)
    )


@pytest.mark.parametrize("group", ["qkv", "down"])
@pytest.mark.parametrize("row_ranks", [[64] * 6, [1, 8, 64, 3, 64, 64, 5], [7] * 40], ids=["uniform", "masked", "40"])
def test_bf16_adapter_panels_give_the_float32_panels_bits(lib, group, row_ranks):
    """An adapter whose weights are bfloat16 values is packed in bfloat16 (half the bytes) and gives the same
    bits as the same values packed in float32 (AVX2 kernels); any other adapter stays float32."""
    from matryoshka_lora.engine.adapter_slots import GROUP_MEMBERS, fuse_group, member_columns
    from matryoshka_lora.engine.lora_batch import build_groups, build_segments

    gen = torch.Generator().manual_seed(len(row_ranks))
    members = {}
    for name in GROUP_MEMBERS[group]:
        i, o = SMOLLM2.module_shape(name)
        a, b = torch.randn(i, 64, generator=gen), torch.randn(64, o, generator=gen) * 0.1
        members[name] = (a.bfloat16().float(), b.bfloat16().float())  # as loaded from a bfloat16 file
    fused = fuse_group(SMOLLM2, group, members, 64)
    as_bf16, as_f32 = lora_panels.PanelLoRA.pack(fused), lora_panels.PanelLoRA.pack(fused, allow_bf16=False)
    assert as_bf16.bf16 and as_bf16.a_panels.dtype == torch.bfloat16 and not as_f32.bf16
    in_f = SMOLLM2.module_shape(GROUP_MEMBERS[group][0])[0]
    out_f = max(c1 for _, c1 in member_columns(SMOLLM2, group).values())
    x = torch.randn(len(row_ranks), in_f, generator=gen)
    groups = build_groups(build_segments([(t, t + 1, 0, r, 0.5 / r) for t, r in enumerate(row_ranks)]))
    ops = cpu_kernels.CKernelOps(lib, 2)
    got = ops.lora_grouped_(torch.zeros(len(row_ranks), out_f), x, groups, [as_bf16])
    want = ops.lora_grouped_(torch.zeros(len(row_ranks), out_f), x, groups, [as_f32])
    if lib.ml_gemm_vectorized():  # the same FMAs on the same values
        assert torch.equal(got, want)
    else:  # plain C loops, which -fassociative-math may vectorise differently
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    members = {k: (a + 1e-4, b) for k, (a, b) in members.items()}  # no longer bfloat16 values
    assert not lora_panels.PanelLoRA.pack(fuse_group(SMOLLM2, group, members, 64)).bf16


@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("row_ranks", [[1, 1, 1, 64], [1, 2, 4, 8, 16, 32, 64], [3, 20, 20, 33, 64]])
def test_a_row_in_a_masked_group_gives_its_bits_alone(c_ops, group, row_ranks):
    """Rows ordered by rank compute only up to their own rank, in fixed rank chunks: each row's output is
    the bits of the same row in a group of its own (a rank-1 row beside rank-64 rows pays for rank 1)."""
    from matryoshka_lora.engine.adapter_slots import GROUP_MEMBERS, fuse_group, member_columns
    from matryoshka_lora.engine.lora_batch import build_groups, build_segments

    gen = torch.Generator().manual_seed(len(row_ranks))
    members = {}
    for name in GROUP_MEMBERS[group]:
        i, o = SMOLLM2.module_shape(name)
        members[name] = (torch.randn(i, 64, generator=gen), torch.randn(64, o, generator=gen) * 0.1)
    panels = [lora_panels.PanelLoRA.pack(fuse_group(SMOLLM2, group, members, 64))]
    in_f = SMOLLM2.module_shape(GROUP_MEMBERS[group][0])[0]
    out_f = max(c1 for _, c1 in member_columns(SMOLLM2, group).values())
    x = torch.randn(len(row_ranks), in_f, generator=gen)
    groups = build_groups(build_segments([(t, t + 1, 0, r, 0.5) for t, r in enumerate(row_ranks)]))
    assert len(groups) == 1 and groups[0].row_ranks is not None  # one masked group
    together = c_ops.lora_grouped_(torch.zeros(len(row_ranks), out_f), x, groups, panels)
    for t, r in enumerate(row_ranks):
        alone = build_groups(build_segments([(0, 1, 0, r, 0.5)]))
        assert torch.equal(together[t], c_ops.lora_grouped_(torch.zeros(1, out_f), x[t : t + 1], alone, panels)[0])
