"""Per-step LoRA metadata, filled once per step and read by every LoRA'd matmul of the forward.

The model runner orders a step's tokens by (adapter slot, rank), so each group is one contiguous
segment of rows; base-model tokens (rank 0) get no segment at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from matryoshka_lora.engine.lora_ops import FusedLoRA, LoRASegment, lora_segmented_


@dataclass
class LoRABatch:
    segments: list[LoRASegment]
    table: list[dict[str, list[FusedLoRA | None]]]  # AdapterSlots.table: layer -> group -> slot -> weights

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        """y[rows of each segment] += its adapter's rank-r delta for this (layer, group)."""
        lora_segmented_(y, x, self.segments, self.table[layer][group])


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
