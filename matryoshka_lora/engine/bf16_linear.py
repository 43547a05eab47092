"""Wide steps in bfloat16 on the CPU's matrix units; narrow steps on the GGUF blocks.

    y = x @ W.T (+ b)          x [T, in] float32, W [out, in] -> y [T, out] float32

`Bf16Linear` keeps W as bfloat16 in oneDNN's packed layout (`torch.ops.mkldnn._reorder_linear_weight`)
and computes

    y = float32(bf16(bf16(x) @ bf16(W).T))  (+ b in float32)     oneDNN accumulates in float32

which runs on AMX tiles where the CPU has them (Sapphire Rapids and later), at a relative error of
~0.3 % per linear against float32 (x and the output rounded to bf16's 8-bit mantissa); its speed per
row count against the blocks: docs/performance.md, "Weight format".

`SplitLinear` holds both copies and picks per call by the row count T (the tokens of the step):

    T <  min_rows:  narrow(x)      the GGUF blocks: fewest bytes, what a decode step is bound by
    T >= min_rows:  wide(x)        Bf16Linear: compute-bound steps (prefill, many sequences)

A narrow step's numbers are the file's own, bit for bit as the "gguf" format; a wide step's are
within the bf16 error above. min_rows is MIN_WIDE_ROWS, or where the blocks run on AMX-INT8 tiles, one
past their row bound (min_wide_rows); both measured (benchmarks/bench_block_linears.py, cache-cold).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from matryoshka_lora.engine.linear import onednn_packing_available

MIN_WIDE_ROWS = 13  # the row count from which bf16 beats the blocks on int8 VNNI rows (bench_block_linears.py)


def min_wide_rows(ops) -> int:
    """The row count from which a SplitLinear takes the bf16 copy: MIN_WIDE_ROWS, or, where the C kernels run
    the blocks' int8 rows on AMX tiles (which beat bf16 up to their row bound), one past that bound."""
    lib = getattr(ops, "lib", None)
    if lib is not None and lib.ml_blocks_min_amx_rows():
        return max(MIN_WIDE_ROWS, lib.ml_blocks_max_int8_rows() + 1)
    return MIN_WIDE_ROWS


def bf16_linear_supported() -> bool:
    """True where oneDNN packs and runs bfloat16 linears on this CPU (AVX512-BF16 or AMX)."""
    return onednn_packing_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def amx_bf16_supported() -> bool:
    """True where those bfloat16 linears run on AMX tiles, where "auto" picks the "gguf+bf16" format."""
    return bf16_linear_supported() and torch.cpu._is_amx_tile_supported()


class Bf16Linear:
    """y = x @ weight.T + bias, weight [out, in] stored once as packed bfloat16; x and y float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, batch_size_hint: int = 128):
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), batch_size_hint)
        self.bias = bias.detach().float().contiguous() if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, None, "none", [], "").float()
        if self.bias is not None:
            y += self.bias
        return y

    @property
    def num_bytes(self) -> int:
        return self.out_features * self.in_features * 2

    def __repr__(self) -> str:
        return f"Bf16Linear({self.in_features} -> {self.out_features}, bias={self.bias is not None})"


class SplitLinear:
    """narrow(x) for steps of fewer than min_rows rows, wide(x) from min_rows up (module docstring)."""

    def __init__(
        self,
        narrow: Callable[[torch.Tensor], torch.Tensor],
        wide: Callable[[torch.Tensor], torch.Tensor],
        min_rows: int = MIN_WIDE_ROWS,
    ):
        self.narrow, self.wide, self.min_rows = narrow, wide, min_rows
        self.out_features = wide.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(x) if x.shape[0] >= self.min_rows else self.narrow(x)

    @property
    def num_bytes(self) -> int:
        """The bytes a narrow step reads (the decode steps' weights)."""
        return self.narrow.num_bytes

    def __repr__(self) -> str:
        return f"SplitLinear(rows < {self.min_rows}: {self.narrow!r}, else {self.wide!r})"


def split_packer(pack_linear: Callable[..., Callable], min_rows: int = MIN_WIDE_ROWS) -> Callable[..., SplitLinear]:
    """pack_linear(weight, bias, batch_size_hint, blocks=...) -> the same call building a SplitLinear whose
    narrow side is what pack_linear builds (the GGUF blocks where given) and whose wide side is Bf16Linear."""

    def pack(weight: torch.Tensor, bias: torch.Tensor | None = None, batch_size_hint: int = 16, **kwargs):
        return SplitLinear(pack_linear(weight, bias, batch_size_hint, **kwargs), Bf16Linear(weight, bias), min_rows)

    return pack
