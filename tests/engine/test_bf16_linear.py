"""Bf16Linear against float32 within bf16's error; SplitLinear's choice by rows; the gguf+bf16 format end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from matryoshka_lora.engine.bf16_linear import (
    MIN_WIDE_ROWS,
    Bf16Linear,
    SplitLinear,
    bf16_linear_supported,
    min_wide_rows,
    split_packer,
)

needs_bf16 = pytest.mark.skipif(not bf16_linear_supported(), reason="oneDNN has no bfloat16 linear on this CPU")

# x and y rounded to bf16 (8-bit mantissa, 2^-9 relative each) plus float32 accumulation over `in`
BF16_RTOL = 1e-2


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_bf16
@pytest.mark.parametrize("num_rows", [1, 3, 16, 17, 130])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape", [(96, 64), (1536, 576)], ids=["small", "qkv"])
def test_bf16_linear_is_float32_within_bf16_error(num_rows, with_bias, shape):
    gen = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(*shape, generator=gen)
    bias = torch.randn(shape[0], generator=gen) if with_bias else None
    x = torch.randn(num_rows, shape[1], generator=gen)
    with torch.inference_mode():
        y = Bf16Linear(weight, bias)(x)
        assert y.dtype == torch.float32 and y.shape == (num_rows, shape[0])
        assert rel_error(y, F.linear(x, weight, bias)) < BF16_RTOL


@needs_bf16
def test_bf16_linear_is_exact_on_bf16_values():
    """Inputs and weights that bf16 holds exactly, small enough that every sum does too: no error at all."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-4, 5, (48, 32), generator=gen).float()
    x = torch.randint(-4, 5, (8, 32), generator=gen).float()
    with torch.inference_mode():
        assert torch.equal(Bf16Linear(weight)(x), x @ weight.T)


class Recorder:
    def __init__(self, name: str, out_features: int = 3):
        self.name, self.out_features, self.calls = name, out_features, []
        self.num_bytes = 7

    def __call__(self, x):
        self.calls.append(x.shape[0])
        return torch.full((x.shape[0], self.out_features), float(self.name == "wide"))


@pytest.mark.parametrize(
    "rows, side",
    [(1, "narrow"), (MIN_WIDE_ROWS - 1, "narrow"), (MIN_WIDE_ROWS, "wide"), (512, "wide")],
)
def test_split_linear_picks_by_row_count(rows, side):
    narrow, wide = Recorder("narrow"), Recorder("wide")
    layer = SplitLinear(narrow, wide)
    layer(torch.zeros(rows, 2))
    assert (narrow.calls, wide.calls) == (([rows], []) if side == "narrow" else ([], [rows]))
    assert layer.out_features == 3 and layer.num_bytes == narrow.num_bytes


class FakeLib:
    def __init__(self, min_amx_rows, max_int8_rows):
        self.ml_blocks_min_amx_rows = lambda: min_amx_rows
        self.ml_blocks_max_int8_rows = lambda: max_int8_rows


@pytest.mark.parametrize(
    "lib, expected",
    [
        (None, MIN_WIDE_ROWS),  # torch ops: no C kernels
        (FakeLib(0, 16), MIN_WIDE_ROWS),  # VNNI rows only
        (FakeLib(0, 0), MIN_WIDE_ROWS),  # no int8 rows
        (FakeLib(8, 32), 33),  # AMX tiles up to 32 rows: the blocks until then
        (FakeLib(8, 4), MIN_WIDE_ROWS),  # never below MIN_WIDE_ROWS
    ],
    ids=["torch-ops", "vnni", "no-int8", "amx", "amx-small-bound"],
)
def test_min_wide_rows_follows_the_blocks_row_bound_on_amx(lib, expected):
    ops = type("Ops", (), {})()
    if lib is not None:
        ops.lib = lib
    assert min_wide_rows(ops) == expected


@needs_bf16
def test_split_packer_passes_blocks_to_the_narrow_side():
    seen = {}

    def pack_linear(weight, bias=None, batch_size_hint=16, blocks=None):
        seen["blocks"] = blocks
        return Recorder("narrow", weight.shape[0])

    layer = split_packer(pack_linear, min_rows=2)(torch.randn(5, 4), None, 16, blocks="the blocks")
    assert seen["blocks"] == "the blocks" and isinstance(layer.wide, Bf16Linear)
    assert layer.min_rows == 2 and "SplitLinear" in repr(layer)
