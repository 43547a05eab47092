"""Scheduled work of one step -> flat token batch + metadata -> one forward -> logits.

Each `StepItem` is one sequence's share of the step: a prompt chunk (prefill) or its one new token
(decode). The runner orders items by (adapter slot, rank) so every LoRA group is one contiguous run
of rows, builds the attention and LoRA metadata once, runs `llama.forward` (a decode-only step: its
layers in one C call, cpu_decode.DecodeLayers, the same bits), and returns the logits of the items that
sample, in the caller's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from matryoshka_lora.engine import llama
from matryoshka_lora.engine.attention import (
    AttentionMeta,
    PrefillChunk,
    build_decode_meta,
)
from matryoshka_lora.engine.cpu_decode import DecodeLayers
from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.lora_batch import (
    MAX_MASKED_ROWS,
    LoRABatch,
    build_groups,
    build_segments,
)
from matryoshka_lora.engine.lora_ops import FusedLoRA, LoRAGroup
from matryoshka_lora.engine.torch_ops import TorchOps
from matryoshka_lora.engine.weights import ModelWeights, rope_tables

BASE_SLOT = -1


@dataclass(frozen=True)
class StepItem:
    token_ids: Sequence[int]  # this step's tokens of the sequence
    slot: int  # its KV cache slot
    position: int  # position of token_ids[0] in the sequence
    sample: bool  # whether the logits at its last token are needed
    adapter_slot: int = BASE_SLOT
    rank: int = 0  # 0 = base model
    scale: float = 0.0  # alpha * s_rank


@dataclass
class StepBatch:
    input_ids: torch.Tensor
    meta: AttentionMeta
    lora: LoRABatch | None
    sample_items: list[int]  # item index of each logits row
    num_tokens: int
    lora_groups: list[LoRAGroup]  # the step's LoRA groups (also what the cost model's features count)


class ModelRunner:
    def __init__(
        self,
        weights: ModelWeights,
        kv: KVCache,
        lora_table: list[dict[str, list[FusedLoRA | None]]] | None = None,
        ops: TorchOps = llama.TORCH_OPS,
    ):
        self.weights, self.kv, self.lora_table, self.ops = weights, kv, lora_table, ops
        self.cos, self.sin = rope_tables(weights, kv.max_model_len)
        self.max_masked_rows = MAX_MASKED_ROWS
        self.prefill_dtype = torch.float32  # the prefill chunks' attention (attention.AttentionMeta)
        # decode-only steps as one C call where the ops and linears allow (cpu_decode; None: llama.forward)
        self.decode_layers = DecodeLayers.build(ops, weights, kv)

    @property
    def max_one_call_rows(self) -> int:
        """The most rows of a decode-only step that run as one C call (0: every step runs llama.forward)."""
        if self.decode_layers is None:
            return 0
        return self.decode_layers.max_rows or self.kv.max_num_seqs

    def prepare(self, items: list[StepItem]) -> StepBatch:
        order = sorted(range(len(items)), key=lambda i: (items[i].adapter_slot, items[i].rank))
        input_ids: list[int] = []
        positions: list[int] = []
        cache_slots: list[int] = []
        prefills: list[PrefillChunk] = []
        dec_rows, dec_slots, dec_lens = [], [], []
        sample_rows, sample_items, row_groups = [], [], []
        for i in order:
            it = items[i]
            start, n = len(input_ids), len(it.token_ids)
            input_ids.extend(it.token_ids)
            pos = range(it.position, it.position + n)
            positions.extend(pos)
            cache_slots.extend([it.slot] * n)
            if n == 1:
                dec_rows.append(start), dec_slots.append(it.slot), dec_lens.append(it.position + 1)
            else:
                prefills.append(PrefillChunk(start, start + n, it.slot, it.position))
            if it.sample:
                sample_rows.append(start + n - 1), sample_items.append(i)
            row_groups.append((start, start + n, it.adapter_slot, it.rank, it.scale))
        pos_t = torch.tensor(positions, dtype=torch.long)
        meta = AttentionMeta(
            positions=pos_t,
            slots=torch.tensor(cache_slots, dtype=torch.long),
            cache_rows=self.kv.write_rows(cache_slots, positions),
            cos=self.cos.index_select(0, pos_t).unsqueeze(1),
            sin=self.sin.index_select(0, pos_t).unsqueeze(1),
            prefills=prefills,
            decode=build_decode_meta(dec_rows, dec_slots, dec_lens) if dec_rows else None,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long),
            prefill_dtype=self.prefill_dtype,
        )
        groups = build_groups(build_segments(row_groups), self.max_masked_rows)
        lora = (
            LoRABatch(groups, self.lora_table, self.ops.lora_grouped_)
            if groups and self.lora_table is not None
            else None
        )
        return StepBatch(torch.tensor(input_ids, dtype=torch.long), meta, lora, sample_items, len(input_ids), groups)

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> tuple[list[int], torch.Tensor]:
        """The forward of a prepared step: (item index per logits row, logits [num_sampled, vocab])."""
        if self.decode_layers is not None and self.decode_layers.takes(batch.meta, batch.num_tokens):
            groups = batch.lora.groups if batch.lora is not None else []
            logits = self.decode_layers.forward(batch.input_ids, batch.meta, groups, self.lora_table)
        else:
            logits = llama.forward(self.weights, batch.input_ids, batch.meta, self.kv, batch.lora, self.ops)
        return batch.sample_items, logits
