"""The grouped LoRA op (per-rank groups, and masked multi-rank groups) == the per-token masked reference
== the core's LoRALinear at each token's rank."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from matryoshka_lora.adapters.layer import LoRALinear
from matryoshka_lora.engine.adapter_slots import fuse_group
from matryoshka_lora.engine.lora_batch import build_groups, build_segments
from matryoshka_lora.engine.lora_ops import lora_grouped_, lora_reference
from matryoshka_lora.engine.weights import model_spec

from .engine_support import tiny_config as tiny_llama_config

R_MAX = 8

# (adapter slot, rank, number of tokens) per run of rows; slot -1 = base model
LAYOUTS = {
    "single": [(0, 8, 3)],
    "mixed-ranks": [(0, 1, 2), (0, 4, 1), (0, 8, 3)],
    "two-adapters": [(0, 2, 2), (1, 2, 2), (1, 7, 1)],
    "with-base": [(-1, 0, 2), (0, 3, 1), (1, 8, 2)],
    "rank0-only": [(-1, 0, 4)],
    "one-token-each": [(1, 1, 1), (1, 5, 1), (0, 8, 1), (0, 2, 1)],
    "long-prefill": [(0, 4, 70), (1, 2, 1), (1, 8, 2)],  # a big single-rank group (a prefill chunk)
}


def make_members(spec, group, num_adapters, gen):
    """Per adapter, per member module: (A [in, r_max], B [r_max, out]) random, B non-zero."""
    from matryoshka_lora.engine.adapter_slots import GROUP_MEMBERS

    out = []
    for _ in range(num_adapters):
        members = {}
        for name in GROUP_MEMBERS[group]:
            i, o = spec.module_shape(name)
            members[name] = (torch.randn(i, R_MAX, generator=gen), torch.randn(R_MAX, o, generator=gen))
        out.append(members)
    return out


def expand(layout):
    slots, ranks = [], []
    for slot, rank, n in layout:
        slots += [max(slot, 0)] * n
        ranks += [rank] * n
    return torch.tensor(slots), torch.tensor(ranks)


@dataclass
class Case:
    """One table row: two random adapters' fused weights, the batch's groups, and the reference delta."""

    x: torch.Tensor
    slots: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor  # each token's scale (0 for base-model tokens)
    adapters: list
    fused: list
    groups: list
    out_features: int
    reference: torch.Tensor


def make_case(layout, group, scale_of, max_masked_rows) -> Case:
    from matryoshka_lora.engine.adapter_slots import GROUP_MEMBERS, member_columns

    spec = model_spec(tiny_llama_config())
    gen = torch.Generator().manual_seed(0)
    adapters = make_members(spec, group, 2, gen)
    members = GROUP_MEMBERS[group]
    in_f = spec.module_shape(members[0])[0]
    slots, ranks = expand(layout)
    x = torch.randn(len(slots), in_f, generator=gen)
    scales = torch.tensor([scale_of(int(r)) if r > 0 else 0.0 for r in ranks])
    rows, start = [], 0
    for slot, rank, n in layout:
        rows.append((start, start + n, slot, rank, scale_of(rank) if rank else 0.0))
        start += n
    # reference: per member, unfused weights, masked per token
    reference = torch.cat(
        [
            lora_reference(
                x,
                torch.stack([a[m][0] for a in adapters]),
                torch.stack([a[m][1] for a in adapters]),
                slots,
                ranks,
                scales,
            )
            for m in members
        ],
        dim=1,
    )
    return Case(
        x,
        slots,
        ranks,
        scales,
        adapters,
        [fuse_group(spec, group, a, R_MAX) for a in adapters],
        build_groups(build_segments(rows), max_masked_rows),
        max(c[1] for c in member_columns(spec, group).values()),
        reference,
    )


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("group", ["qkv", "o", "gate_up", "down"])
@pytest.mark.parametrize("scale_of", [lambda r: 1.0, lambda r: 2.0 / r], ids=["none", "alpha2-rank"])
@pytest.mark.parametrize("max_masked_rows", [0, 3, 64], ids=["per-rank", "some-masked", "all-masked"])
def test_grouped_equals_reference_and_layer(layout, group, scale_of, max_masked_rows, step_ops):
    """Both op sets: lora_ops.lora_grouped_ (torch_ops) and the C kernel (cpu_kernels)."""
    from matryoshka_lora.engine.adapter_slots import GROUP_MEMBERS

    spec = model_spec(tiny_llama_config())
    c = make_case(layout, group, scale_of, max_masked_rows)
    x, slots, ranks, adapters, ref = c.x, c.slots, c.ranks, c.adapters, c.reference
    packed = [step_ops.pack_lora(w) for w in c.fused]
    fast = step_ops.lora_grouped_(torch.zeros(len(slots), c.out_features), x, c.groups, packed)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)

    # the core's LoRALinear, one adapter at a time, each token at its rank (other adapter's tokens: rank 0)
    by_layer = torch.zeros_like(ref)
    for a_idx, a in enumerate(adapters):
        token_ranks = torch.where(slots == a_idx, ranks, torch.zeros_like(ranks))
        parts = []
        for m in GROUP_MEMBERS[group]:
            i, o = spec.module_shape(m)
            layer = LoRALinear(torch.nn.Linear(i, o, bias=False), R_MAX, scaling="none")
            with torch.no_grad():
                layer.lora_A.copy_(a[m][0]), layer.lora_B.copy_(a[m][1])
            layer.set_inference_ranks(token_ranks)
            token_scale = torch.tensor([scale_of(int(r)) if r > 0 else 0.0 for r in token_ranks]).unsqueeze(1)
            parts.append((layer(x) - layer.base_forward(x)) * token_scale)
        by_layer += torch.cat(parts, dim=1)
    torch.testing.assert_close(fast, by_layer, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("group", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("max_masked_rows", [0, 64], ids=["per-rank", "all-masked"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_torch_ops_on_cuda_equal_the_cpu_reference(layout, group, max_masked_rows, dtype, rtol):
    """The torch op set runs wherever its inputs lie: the grouped op and the reference on the GPU give the
    CPU reference's delta (bf16 within its rounding)."""
    c = make_case(layout, group, lambda r: 2.0 / r, max_masked_rows)
    x = c.x.to("cuda", dtype)
    fast = lora_grouped_(
        torch.zeros(len(c.slots), c.out_features, device="cuda", dtype=dtype),
        x,
        c.groups,
        [w.to("cuda", dtype) for w in c.fused],
    )
    assert fast.device.type == "cuda" and fast.dtype == dtype
    atol = rtol * max(c.reference.abs().max().item(), 1.0)
    torch.testing.assert_close(fast.float().cpu(), c.reference, atol=atol, rtol=rtol)
    on_gpu = torch.cat(
        [
            lora_reference(
                x,
                torch.stack([a[m][0] for a in c.adapters]).to("cuda", dtype),
                torch.stack([a[m][1] for a in c.adapters]).to("cuda", dtype),
                c.slots.cuda(),
                c.ranks.cuda(),
                c.scales.to("cuda", dtype),
            )
            for m in c.adapters[0]
        ],
        dim=1,
    )
    torch.testing.assert_close(on_gpu.float().cpu(), c.reference, atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([(0, 2, 0, 4, 1.0), (2, 3, 0, 4, 1.0)], [(0, 3, 0, 4)]),  # same group merges
        ([(0, 2, 0, 4, 1.0), (2, 3, 0, 8, 1.0)], [(0, 2, 0, 4), (2, 3, 0, 8)]),
        ([(0, 2, -1, 0, 0.0), (2, 5, 1, 1, 1.0)], [(2, 5, 1, 1)]),  # base rows: no segment
        ([(0, 1, 0, 2, 1.0), (1, 2, 1, 2, 1.0), (2, 3, 0, 2, 1.0)], [(0, 1, 0, 2), (1, 2, 1, 2), (2, 3, 0, 2)]),
    ],
)
def test_build_segments(rows, expected):
    assert [(s.start, s.end, s.slot, s.rank) for s in build_segments(rows)] == expected


def test_partial_targets_fuse(step_ops):
    """An adapter on q and v only: k's output columns get nothing, q and v get their deltas."""
    spec = model_spec(tiny_llama_config())
    gen = torch.Generator().manual_seed(1)
    members = {
        m: (
            torch.randn(spec.module_shape(m)[0], R_MAX, generator=gen),
            torch.randn(R_MAX, spec.module_shape(m)[1], generator=gen),
        )
        for m in ("q_proj", "v_proj")
    }
    fused = fuse_group(spec, "qkv", members, R_MAX)
    assert fused.num_members == 2
    x = torch.randn(3, spec.hidden_size, generator=gen)
    groups = build_groups(build_segments([(0, 1, 0, 3, 1.0), (1, 3, 0, 2, 1.0)]))
    y = step_ops.lora_grouped_(torch.zeros(3, spec.q_size + 2 * spec.kv_size), x, groups, [step_ops.pack_lora(fused)])
    ranks = torch.tensor([3, 2, 2]).unsqueeze(1)

    def delta(a, b):  # each row at its own rank
        return torch.cat([x[t : t + 1] @ a[:, : ranks[t]] @ b[: ranks[t]] for t in range(3)])

    q, v = delta(*members["q_proj"]), delta(*members["v_proj"])
    expected = torch.cat([q, torch.zeros(3, spec.kv_size), v], dim=1)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "segments, max_rows, expected",
    [
        # (start, end, slot, rank) -> groups as (start, end, slot, max rank, masked?)
        ([(0, 2, 0, 1), (2, 3, 0, 8)], 64, [(0, 3, 0, 8, True)]),  # one adapter, two ranks: one masked group
        ([(0, 2, 0, 1), (2, 3, 0, 8)], 2, [(0, 2, 0, 1, False), (2, 3, 0, 8, False)]),  # too many rows to mask
        ([(0, 2, 0, 4), (2, 3, 1, 4)], 64, [(0, 2, 0, 4, False), (2, 3, 1, 4, False)]),  # adapters never merge
        ([(0, 100, 0, 2), (100, 101, 0, 8)], 64, [(0, 100, 0, 2, False), (100, 101, 0, 8, False)]),  # prefill alone
        ([(0, 1, 0, 1), (1, 2, 0, 2), (2, 3, 0, 4), (3, 4, 0, 8)], 2, [(0, 2, 0, 2, True), (2, 4, 0, 8, True)]),
    ],
)
def test_build_groups(segments, max_rows, expected):
    from matryoshka_lora.engine.lora_ops import LoRASegment

    groups = build_groups([LoRASegment(*s, 1.0) for s in segments], max_rows)
    assert [(g.start, g.end, g.slot, g.rank, g.row_ranks is not None) for g in groups] == expected
