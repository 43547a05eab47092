"""The per-token-rank LoRA op: a plain reference and the fast segmented op.

Semantics (docs/architecture.md, "Per-token rank op"), for each token t with adapter a_t, rank r_t:

    y[t] += scale_t * (x[t] @ A[a_t][:, :r_t]) @ B[a_t][:r_t]        r_t = 0: nothing added

`lora_reference` computes this literally, per token, with full-width weights and a column mask.
`lora_grouped_` is the fast op. The tokens are ordered by (adapter, rank), so each adapter's rows are
one contiguous run, and the runner cuts them into `LoRAGroup`s (lora_batch.build_groups):

  * a group of one rank (a prefill chunk, or every decode token of that adapter at one rank) is two
    matmuls at exactly that rank: its cost is O(r);
  * a group of a few decode rows at several ranks is two matmuls at the largest of them, the columns
    above each row's own rank zeroed between the two (the row's scale folded into the same mask).
    With few rows the op is bound by reading the weights, and the rank-r slices are nested prefixes
    of the rank-R one: reading it once costs less than reading every slice, one dispatch instead of
    one per rank. The result equals the per-rank slices exactly (the masked columns add 0); the C op
    (cpu_gemm.c) also skips the column blocks and rank chunks above each row's own rank.

Either way the step reads each adapter's weights at most once, at the largest rank it serves in that
step: a step of only rank-1 requests reads 1/64 of what rank 64 reads.
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


@dataclass(eq=False)
class LoRAGroup:
    """Rows [start, end) of the batch use adapter `slot`, every row at a rank <= `rank`.

    row_ranks / row_scales: None when every row is at `rank` with `scale`; else each row's own.
    """

    start: int
    end: int
    slot: int
    rank: int
    scale: float
    row_ranks: torch.Tensor | None = None
    row_scales: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict, repr=False)

    def mask(self, num_members: int, device: torch.device | None = None) -> torch.Tensor:
        """[rows, k * rank]: row t's scale on the columns of its own rank (c < k * r_t), 0 above; made once
        per (k, device), on `device` (default: where row_ranks lie)."""
        mask = self._masks.get((num_members, device))
        if mask is None:
            columns = torch.arange(num_members * self.rank)
            keep = columns.unsqueeze(0) < (num_members * self.row_ranks).unsqueeze(1)
            mask = self._masks[num_members, device] = (keep * self.row_scales.unsqueeze(1)).to(device)
        return mask


@dataclass(frozen=True, eq=False)
class FusedLoRA:
    """One adapter's weights for one (layer, group) of k fused modules, stored once at r_max.

    lora_A [in, k * r_max]: member-interleaved, column j * k + m = column j of member m's A, so the
        rank-r shrink of all k members is one matmul with the first k * r columns.
    lora_B: per member m, B_m [r_max, out_m], and columns [c0_m, c1_m) of the group's output it writes.
        The rank-r expand of member m is h[:, m::k] @ B_m[:r] (its own rows only, no zero blocks).
    """

    lora_A: torch.Tensor
    lora_B: tuple[tuple[torch.Tensor, int, int], ...]
    _slices: dict = field(default_factory=dict, repr=False)

    @property
    def num_members(self) -> int:
        return len(self.lora_B)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FusedLoRA:
        """The same weights on another device and/or dtype (the torch op runs wherever its inputs lie)."""
        lora_B = tuple((b.to(device, dtype), c0, c1) for b, c0, c1 in self.lora_B)
        return FusedLoRA(self.lora_A.to(device, dtype), lora_B)

    def at_rank(self, rank: int) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, int, int], ...]]:
        """(A[:, :k r], ((B_m[:r], c0_m, c1_m) per member)) as views, made once per rank (slicing costs
        dispatch time every step)."""
        views = self._slices.get(rank)
        if views is None:
            views = self._slices[rank] = (
                self.lora_A[:, : self.num_members * rank],
                tuple((b[:rank], c0, c1) for b, c0, c1 in self.lora_B),
            )
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
    mask = torch.arange(a.shape[-1], device=a.device).unsqueeze(0) < token_widths.unsqueeze(1)  # [T, R]
    h = torch.bmm(x.unsqueeze(1), a).squeeze(1) * mask
    return torch.bmm(h.unsqueeze(1), b).squeeze(1) * token_scales.unsqueeze(1)


def lora_grouped_(
    y: torch.Tensor, x: torch.Tensor, groups: list[LoRAGroup], weights: list[FusedLoRA | None]
) -> torch.Tensor:
    """The fast op, in place on y.

        for g in groups:
            A, B, k = weights[g.slot]                 # stored once at r_max
            h = x[g.start:g.end] @ A[:, :k * g.rank]  # the rank-R shrink of all k fused modules
            if g.row_ranks is not None:
                h *= g.mask(k)                        # per row: zero above its rank, times its scale
            for m, (B_m, c0, c1) in enumerate(B):     # expand each member into its output columns
                y[g.start:g.end, c0:c1] += (g.scale if g.row_ranks is None else 1) * h[:, m::k] @ B_m[:g.rank]
    A group whose adapter has no weights for this module (weights[slot] is None) adds nothing.
    """
    for g in groups:
        w = weights[g.slot]
        if w is None:
            continue
        lora_A, lora_B = w.at_rank(g.rank)
        h = x[g.start : g.end] @ lora_A
        alpha = g.scale
        if g.row_ranks is not None:
            h.mul_(g.mask(len(lora_B), h.device))
            alpha = 1.0
        k = len(lora_B)
        rows = y[g.start : g.end]
        for m, (lora_B_m, c0, c1) in enumerate(lora_B):
            rows[:, c0:c1].addmm_(h[:, m::k] if k > 1 else h, lora_B_m, alpha=alpha)
    return y
