"""The per-token-rank LoRA op: a plain reference and the fast segmented op.

Semantics (docs/architecture.md, "Per-token rank op"), for each token t with adapter a_t, rank r_t:

    y[t] += scale_t * (x[t] @ A[a_t][:, :r_t]) @ B[a_t][:r_t]        r_t = 0: nothing added

`lora_reference` computes this literally, per token, with full-width weights and a column mask.
`lora_segmented_` assumes the tokens are ordered so that each (adapter, rank) group is a contiguous
segment and does two small matmuls per segment; its cost is O(r) per segment, so a rank-1 token never
pays for a rank-64 neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoRASegment:
    """Rows [start, end) of the batch use adapter `slot` at `rank`, times `scale` (= alpha * s_rank)."""

    start: int
    end: int
    slot: int
    rank: int
    scale: float


@dataclass(frozen=True, eq=False)
class FusedLoRA:
    """One adapter's weights for one (layer, group) of k fused modules, stored once at r_max.

    lora_A [in, k * r_max]: member-interleaved, column j * k + m = column j of member m's A.
    lora_B [k * r_max, out]: block-structured, row j * k + m = row j of member m's B, placed in member
    m's output columns, zeros elsewhere. So the rank-r adapter of all k members is the first k * r
    columns of A and rows of B:  x @ A[:, :k r] @ B[:k r] = concat_m(x @ A_m[:, :r] @ B_m[:r]).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    num_members: int
    _slices: dict = field(default_factory=dict, repr=False)

    def at_rank(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:, :k r], B[:k r]) as views, made once per rank (slicing costs dispatch time every step)."""
        views = self._slices.get(rank)
        if views is None:
            width = self.num_members * rank
            views = self._slices[rank] = (self.lora_A[:, :width], self.lora_B[:width])
        return views


def lora_reference(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    token_slots: torch.Tensor,
    token_widths: torch.Tensor,
    token_scales: torch.Tensor,
) -> torch.Tensor:
    """The per-token masked op, the definition the fast op is tested against.

        for every token t:
            A_t = lora_A[token_slots[t]]                   # [in, R], full width
            B_t = lora_B[token_slots[t]]                   # [R, out]
            m   = (arange(R) < token_widths[t])            # keep the first r_t columns
            delta[t] = token_scales[t] * ((x[t] @ A_t) * m) @ B_t
    lora_A [num_slots, in, R], lora_B [num_slots, R, out]; x [T, in] -> delta [T, out].
    """
    a = lora_A.index_select(0, token_slots)  # [T, in, R]
    b = lora_B.index_select(0, token_slots)  # [T, R, out]
    mask = torch.arange(a.shape[-1]).unsqueeze(0) < token_widths.unsqueeze(1)  # [T, R]
    h = torch.bmm(x.unsqueeze(1), a).squeeze(1) * mask
    return torch.bmm(h.unsqueeze(1), b).squeeze(1) * token_scales.unsqueeze(1)


def lora_segmented_(
    y: torch.Tensor, x: torch.Tensor, segments: list[LoRASegment], weights: list[FusedLoRA | None]
) -> torch.Tensor:
    """The fast op, in place on y.

        for seg in segments:                     # one (adapter, rank) group each
            A, B, k = weights[seg.slot]          # stored once at r_max
            w = k * seg.rank                     # the rank-r slice of k fused modules
            y[seg.start:seg.end] += seg.scale * (x[seg.start:seg.end] @ A[:, :w]) @ B[:w]
    A segment whose adapter has no weights for this module (weights[slot] is None) adds nothing.
    """
    for seg in segments:
        w = weights[seg.slot]
        if w is None or seg.rank == 0:
            continue
        lora_A, lora_B = w.at_rank(seg.rank)
        y[seg.start : seg.end].addmm_(x[seg.start : seg.end] @ lora_A, lora_B, alpha=seg.scale)
    return y
