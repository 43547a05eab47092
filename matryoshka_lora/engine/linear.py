"""A frozen linear layer, its weight pre-packed once for the CPU's fastest GEMM.

    y = x @ W (+ b)          x [T, in], W [in, out] -> y [T, out]

On CPUs with oneDNN (every x86/ARM torch wheel) the weight is reordered once into oneDNN's blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU backend does for frozen
linears) and every call runs `mkldnn._linear_pointwise` on it. For the engine's small-batch decode
shapes that is 1.5-3x faster than MKL's `x @ W` on a row-major weight (benchmarks/README.md, "Packed
linear"). Anywhere the packed path is unavailable (no oneDNN, not float32, not on the CPU) it is a
plain `addmm` on the transposed weight; both give the same result up to float rounding.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_packing_disabled: list[str] = []  # why packing fell back, logged once


def onednn_packing_available() -> bool:
    """True where this torch build packs linear weights for oneDNN (mkldnn._reorder_linear_weight)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_packing_available()


class PackedLinear:
    """y = x @ weight.T + bias for a frozen weight [out, in] (nn.Linear's layout), inference only.

    batch_size_hint: the row count oneDNN tunes the packed layout for (the decode batch); any row
    count works.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, batch_size_hint: int = 16, pack: bool = True
    ):
        self.out_features, self.in_features = weight.shape
        self.bias = bias.detach().contiguous() if bias is not None else None
        self.weight = weight.detach().contiguous()  # [out, in]
        self.packed: torch.Tensor | None = None
        if pack and _can_pack(self.weight):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_size_hint)
            except RuntimeError as exc:  # an unusual build: keep the plain path
                if not _packing_disabled:
                    _packing_disabled.append(str(exc))
                    log.warning("oneDNN weight packing unavailable, using plain matmuls: %s", exc)
        if self.packed is not None:
            self.weight = None  # the packed copy is the only one kept

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def __repr__(self) -> str:
        kind = "packed" if self.packed is not None else "plain"
        return f"PackedLinear({self.in_features} -> {self.out_features}, {kind}, bias={self.bias is not None})"
