"""A frozen linear layer for the C kernels: its weight stored once as panels, run by `ml_linear` (cpu_gemm.c).

    y = x @ W.T (+ b)          x [T, in], W [out, in] (nn.Linear's layout) -> y [T, out]

Panel layout: W's rows (the outputs) cut into panels of PANEL = 16, each stored input-major, so the
kernel streams every panel once, front to back:

    panels[p, k, j] = W[p * 16 + j, k]          (0 where p * 16 + j >= out)      [num_panels, in, 16]

`PanelLinear` is what `CKernelOps.pack_linear` builds in place of `linear.PackedLinear` (oneDNN), with
the same call; tests hold the two equal to nn.Linear.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

PANEL = 16  # NR of cpu_gemm.c


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """W [out, in] -> panels [ceil(out / 16), in, 16], zero-padded (the layout above)."""
    out_features, in_features = weight.shape
    num_panels = -(-out_features // PANEL)
    padded = F.pad(weight, (0, 0, 0, num_panels * PANEL - out_features))
    return padded.reshape(num_panels, PANEL, in_features).transpose(1, 2).contiguous()


class PanelLinear:
    """y = x @ weight.T + bias for a frozen float32 weight [out, in], inference only.

    lib: the loaded C kernels (cpu_kernels); num_threads: called per call for the OpenMP thread count.
    """

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None, num_threads: Callable[[], int]):
        if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
            raise TypeError(f"PanelLinear is float32 only, got {weight.dtype}")
        self.lib, self.num_threads = lib, num_threads
        self.out_features, self.in_features = weight.shape
        self.panels = pack_panels(weight.detach())
        self.bias = bias.detach().contiguous() if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        rows = x.shape[0]
        y = torch.empty((rows, self.out_features), dtype=x.dtype)
        if rows:
            self.lib.ml_linear(
                x.data_ptr(), x.stride(0), rows, self.in_features, self.panels.data_ptr(), self.out_features,
                self.bias.data_ptr() if self.bias is not None else None, y.data_ptr(), y.stride(0), self.num_threads())
        return y

    def __repr__(self) -> str:
        return f"PanelLinear({self.in_features} -> {self.out_features}, bias={self.bias is not None})"
