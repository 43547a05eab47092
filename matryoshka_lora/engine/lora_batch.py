"""Per-step LoRA metadata, filled once per step and read by every LoRA'd matmul of the forward.

The model runner orders a step's tokens by (adapter slot, rank), so each adapter's rows are one
contiguous run; base-model tokens (rank 0) get no group at all. `build_groups` cuts that run into the
`LoRAGroup`s the op works on (see lora_ops for why a few decode rows at several ranks share one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from matryoshka_lora.engine.lora_ops import (
    FusedLoRA,
    LoRAGroup,
    LoRASegment,
    lora_grouped_,
)

# Up to this many rows of one adapter, its segments at different ranks share one masked matmul: below
# it the op is bound by reading the adapter's weights (benchmarks/README.md, "Grouped LoRA op").
MAX_MASKED_ROWS = 64


@dataclass
class LoRABatch:
    groups: list[LoRAGroup]
    table: list[dict[str, list[FusedLoRA | None]]]  # AdapterSlots.table: layer -> group -> slot -> weights
    op: Callable = lora_grouped_  # lora_ops.lora_grouped_, or CKernelOps.lora_grouped_ (same semantics)

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        """y[rows of each group] += its adapter's per-row rank-r delta for this (layer, group)."""
        self.op(y, x, self.groups, self.table[layer][group])


def build_segments(row_groups: list[tuple[int, int, int, int, float]]) -> list[LoRASegment]:
    """(start, end, adapter slot, rank, scale) per scheduled sequence, in row order -> merged segments.

    Consecutive sequences with the same (slot, rank) merge into one segment; rank 0 rows are dropped.
    """
    segments: list[LoRASegment] = []
    for start, end, slot, rank, scale in row_groups:
        if rank == 0 or end == start:
            continue
        last = segments[-1] if segments else None
        if last is not None and last.end == start and last.slot == slot and last.rank == rank:
            segments[-1] = LoRASegment(last.start, end, slot, rank, scale)
        else:
            segments.append(LoRASegment(start, end, slot, rank, scale))
    return segments


def build_groups(segments: list[LoRASegment], max_masked_rows: int = MAX_MASKED_ROWS) -> list[LoRAGroup]:
    """Segments in row order -> groups: adjacent segments of one adapter merge while the merged group
    has at most `max_masked_rows` rows; anything larger (a prefill chunk) stays a group of its own rank."""
    runs: list[list[LoRASegment]] = []
    for seg in segments:
        run = runs[-1] if runs else None
        if (
            run is not None
            and run[-1].slot == seg.slot
            and run[-1].end == seg.start
            and seg.end - run[0].start <= max_masked_rows
        ):
            run.append(seg)
        else:
            runs.append([seg])
    return [_group(run) for run in runs]


def _group(run: list[LoRASegment]) -> LoRAGroup:
    first, last = run[0], run[-1]
    if len(run) == 1:
        return LoRAGroup(first.start, first.end, first.slot, first.rank, first.scale)
    ranks, scales = [], []
    for seg in run:
        ranks += [seg.rank] * (seg.end - seg.start)
        scales += [seg.scale] * (seg.end - seg.start)
    return LoRAGroup(
        first.start,
        last.end,
        first.slot,
        max(ranks),
        0.0,
        torch.tensor(ranks),
        torch.tensor(scales, dtype=torch.float32),
    )
