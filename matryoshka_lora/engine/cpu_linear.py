"""A frozen linear layer for the C kernels: its weight stored once as panels, run by `ml_linear` (cpu_gemm.c).

    y = x @ W.T (+ b)          x [T, in], W [out, in] (nn.Linear's layout) -> y [T, out]

Panel layout: W's rows (the outputs) cut into panels of PANEL = 16, each stored input-major, so the
kernel streams every panel once, front to back:

    panels[p, k, j] = W[p * 16 + j, k]          (0 where p * 16 + j >= out)      [num_panels, in, 16]

`PanelLinear` is what `CKernelOps.pack_linear` builds in place of `linear.PackedLinear` (oneDNN), with
the same call; tests hold the two equal to nn.Linear.

`BlockLinear` is the same linear on a GGUF file's own blocks (gguf_weights.BlockWeight, run by
`ml_linear_blocks`, cpu_gemm_blocks.c), in panels of 16 outputs, one record per block of 32 inputs:

    Q4_1: record[p, blk] = d[16] f16 | m[16] f16 | q[32][8] u8     q[kk][j] = q[p*16+j, k] | q[p*16+j+8, k] << 4
    Q8_0: record[p, blk] = d[16] f16 | q[32][16] i8                  (k = blk * 32 + kk)

Where the CPU has AVX512-VNNI, steps of up to 16 rows (one user, a few sequences; 32 where AMX-INT8 tiles
run them, from 8 rows) run on x quantised to int8 per block of 32, as llama.cpp's dot products do (about
0.5 % relative error; each row's result independent of the other rows); above that, and everywhere without VNNI from 2 rows, it gives the same
bits as PanelLinear on the dequantised weight, and one row without VNNI sums in another order, equal to
float rounding. Tests hold each to its reference.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
import torch.nn.functional as F

from matryoshka_lora.engine.gguf_weights import BLOCK_K, BlockWeight

PANEL = 16  # NR of cpu_gemm.c
BLOCK_KINDS = {"Q4_1": 0, "Q8_0": 1}  # the kind argument of ml_linear_blocks


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """W [out, in] -> panels [ceil(out / 16), in, 16], zero-padded (the layout above)."""
    out_features, in_features = weight.shape
    num_panels = -(-out_features // PANEL)
    padded = F.pad(weight, (0, 0, 0, num_panels * PANEL - out_features))
    return padded.reshape(num_panels, PANEL, in_features).transpose(1, 2).contiguous()


def unpack_panels(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """pack_panels' inverse: panels [num_panels, in, 16] -> W [out_features, in] (padding dropped)."""
    num_panels, in_features, _ = panels.shape
    return panels.transpose(1, 2).reshape(num_panels * PANEL, in_features)[:out_features].contiguous()


def _by_panel(t: torch.Tensor) -> torch.Tensor:
    """[out, ...] -> [num_panels, 16, ...], zero-padded to whole panels."""
    num_panels = -(-t.shape[0] // PANEL)
    pad = [0, 0] * (t.dim() - 1) + [0, num_panels * PANEL - t.shape[0]]
    return F.pad(t, pad).view(num_panels, PANEL, *t.shape[1:])


def pack_blocks(w: BlockWeight) -> torch.Tensor:
    """A BlockWeight -> its records, uint8 [num_panels, in / 32, record bytes] (the layout above)."""
    out, in_features = w.shape
    nkb = in_features // BLOCK_K
    d = _by_panel(w.d.half()).transpose(1, 2).contiguous().view(torch.uint8)  # [P, nkb, 16 * 2]: the file's f16
    q = _by_panel(w.q.view(out, nkb, BLOCK_K)).permute(0, 2, 3, 1)  # [P, nkb, 32, 16]
    if w.kind == "Q4_1":
        m = _by_panel(w.m.half()).transpose(1, 2).contiguous().view(torch.uint8)
        nibbles = (q[..., :8] | (q[..., 8:] << 4)).reshape(q.shape[0], nkb, -1)
        return torch.cat([d, m, nibbles], dim=-1).contiguous()
    return torch.cat([d, q.contiguous().view(torch.uint8).reshape(q.shape[0], nkb, -1)], dim=-1).contiguous()


class _CLinear:
    """The call shared by the C linears: x [T, in] (unit stride in its last dimension) -> y [T, out] float32;
    a subclass's `_launch(x, y, rows)` runs its kernel."""

    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        rows = x.shape[0]
        y = torch.empty((rows, self.out_features), dtype=x.dtype)
        if rows:
            self._launch(x, y, rows)
        return y

    def _bias_ptr(self):
        return self.bias.data_ptr() if self.bias is not None else None


class PanelLinear(_CLinear):
    """y = x @ weight.T + bias for a frozen float32 weight [out, in], inference only.

    lib: the loaded C kernels (cpu_kernels); num_threads: called per call for the OpenMP thread count.
    """

    def __init__(
        self, lib: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None, num_threads: Callable[[], int]
    ):
        if weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
            raise TypeError(f"PanelLinear is float32 only, got {weight.dtype}")
        self.lib, self.num_threads = lib, num_threads
        self.out_features, self.in_features = weight.shape
        self.panels = pack_panels(weight.detach())
        self.bias = bias.detach().contiguous() if bias is not None else None

    def _launch(self, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
        self.lib.ml_linear(
            x.data_ptr(),
            x.stride(0),
            rows,
            self.in_features,
            self.panels.data_ptr(),
            self.out_features,
            self._bias_ptr(),
            y.data_ptr(),
            y.stride(0),
            self.num_threads(),
        )

    def __repr__(self) -> str:
        return f"PanelLinear({self.in_features} -> {self.out_features}, bias={self.bias is not None})"


class BlockLinear(_CLinear):
    """y = x @ W.T + bias for W given as GGUF blocks (Q4_1 or Q8_0), inference only; see the module docstring."""

    def __init__(
        self, lib: ctypes.CDLL, blocks: BlockWeight, bias: torch.Tensor | None, num_threads: Callable[[], int]
    ):
        if blocks.kind not in BLOCK_KINDS or blocks.shape[1] % BLOCK_K:
            raise ValueError(
                f"BlockLinear takes {sorted(BLOCK_KINDS)} with in_features % 32 == 0, got {blocks.kind} {blocks.shape}"
            )
        self.lib, self.num_threads, self.kind = lib, num_threads, blocks.kind
        self.out_features, self.in_features = blocks.shape
        self.records = pack_blocks(blocks)
        self.bias = bias.detach().float().contiguous() if bias is not None else None

    def _launch(self, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
        self.lib.ml_linear_blocks(
            x.data_ptr(),
            x.stride(0),
            rows,
            self.in_features,
            self.records.data_ptr(),
            BLOCK_KINDS[self.kind],
            self.out_features,
            self._bias_ptr(),
            y.data_ptr(),
            y.stride(0),
            self.num_threads(),
        )

    @property
    def num_bytes(self) -> int:
        return self.records.numel()

    def __repr__(self) -> str:
        return f"BlockLinear({self.in_features} -> {self.out_features}, {self.kind}, bias={self.bias is not None})"
