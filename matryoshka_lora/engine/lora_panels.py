"""One adapter's weights for one module group as the C LoRA kernel reads them (`PanelLoRA`): the storage
half of the C LoRA op, apart from the kernel (cpu_gemm.c `ml_lora_group`) and its per-step groups
(lora_batch). `CKernelOps.pack_lora` builds one per (layer, group) as an adapter is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from matryoshka_lora.engine.cpu_linear import pack_panels, unpack_panels
from matryoshka_lora.engine.lora_ops import FusedLoRA


@dataclass(frozen=True, eq=False)
class PanelLoRA:
    """One adapter's weights for one (layer, group) of k fused modules as cpu_gemm.c reads them, at r_max.

    a_panels [ceil(k r_max / 16), in, 16]: FusedLoRA.lora_A's columns (member-interleaved) as panels of 16,
        so a rank-r group reads the first ceil(k r / 16) panels, each one sequential read;
    b_panels: per member m, B_m [r_max, out_m] as panels [ceil(out_m / 16), r_max, 16] (rank r: the first
        r rows of each panel); b_table [3, k]: their addresses, and the output columns [c0_m, c1_m).
    bf16: every weight is a bfloat16 value (an adapter saved in bfloat16), so the panels are kept in
        bfloat16, half the bytes a step reads, and widened exactly in registers; else float32.
    pointers: the addresses ml_lora_group takes (a_panels, b_table's three rows), read once here rather
        than on each of a decode step's 120 calls.
    fused(): the same weights as a float32 FusedLoRA (what the MKL path of wide groups reads), unpacked on
        first use and kept: twice a bf16 adapter's bytes more, only for adapters that serve wide groups.
    """

    a_panels: torch.Tensor
    b_panels: tuple[torch.Tensor, ...]
    b_table: torch.Tensor
    num_members: int
    r_max: int
    bf16: bool = False
    pointers: tuple[int, int, int, int] = field(init=False)
    _fused: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        rows = [self.b_table[i].data_ptr() for i in range(3)]
        object.__setattr__(self, "pointers", (self.a_panels.data_ptr(), *rows))

    def fused(self) -> FusedLoRA:
        """The FusedLoRA this was packed from, in float32 (pack's inverse; exact)."""
        if not self._fused:
            lora_A = unpack_panels(self.a_panels, self.num_members * self.r_max).t().float().contiguous()
            c0s, c1s = self.b_table[1].tolist(), self.b_table[2].tolist()
            lora_B = tuple(
                (unpack_panels(b, c1 - c0).t().float().contiguous(), c0, c1)
                for b, c0, c1 in zip(self.b_panels, c0s, c1s)
            )
            self._fused.append(FusedLoRA(lora_A, lora_B))
        return self._fused[0]

    @classmethod
    def pack(cls, w: FusedLoRA, allow_bf16: bool = True) -> PanelLoRA:
        weights = [w.lora_A, *(b for b, _, _ in w.lora_B)]
        bf16 = allow_bf16 and all(torch.equal(t.to(torch.bfloat16).float(), t.float()) for t in weights)
        dtype = torch.bfloat16 if bf16 else torch.float32
        b_panels = tuple(pack_panels(b.t()).to(dtype) for b, _, _ in w.lora_B)
        table = torch.tensor(
            [[b.data_ptr() for b in b_panels], [c0 for _, c0, _ in w.lora_B], [c1 for _, _, c1 in w.lora_B]],
            dtype=torch.long,
        )
        a_panels = pack_panels(w.lora_A.t()).to(dtype)
        return cls(a_panels, b_panels, table, w.num_members, w.lora_A.shape[1] // w.num_members, bf16)
