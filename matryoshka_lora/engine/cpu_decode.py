"""A decode-only step's transformer layers as one C call (`ml_decode_layers`, cpu_decode.c).

    DecodeLayers.forward(input_ids, meta, lora_groups, lora_table)
        == llama.forward(weights, input_ids, meta, kv, LoRABatch(lora_groups, lora_table), ops)   bit for bit

llama.forward with CKernelOps makes ~13 calls a layer (linears, LoRA groups, norms, RoPE, attention,
SiLU-mul, residual adds); at one sequence each reads a few kilobytes to a megabyte and costs a few
microseconds of Python and ctypes on top, as much as its bytes. For a step whose rows are all decode
tokens, `DecodeLayers` hands the whole stack to C in one call: the embedding lookup, the final norm
and the LM head stay in Python (one call each). The C loop calls the same kernels in the same order,
so its output is llama.forward's to the bit (tested) where llama.forward runs the same linears: with
the gguf+bf16 format it also takes decode steps of 13-16 rows on VNNI-only CPUs, which llama.forward
would run on bf16, on the blocks (int8 activations: as fast as bf16 at 16 rows, and the Python calls
saved). Any step it does not take (a prefill chunk, more rows, torch ops) runs llama.forward.

Built once per engine (`DecodeLayers.build`, None where a layer's linear is not a C linear), from
tables of addresses: the layers' weights, and per adapter slot its LoRA groups' panels (`_slot_table`,
rebuilt when the slot's weights change).
"""

from __future__ import annotations

import operator
import weakref

import torch

from matryoshka_lora.engine.adapter_slots import GROUPS
from matryoshka_lora.engine.attention import AttentionMeta
from matryoshka_lora.engine.bf16_linear import SplitLinear
from matryoshka_lora.engine.cpu_kernels import CKernelOps
from matryoshka_lora.engine.cpu_linear import BLOCK_KINDS, BlockLinear, PanelLinear
from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.lora_ops import LoRAGroup
from matryoshka_lora.engine.lora_panels import PanelLoRA
from matryoshka_lora.engine.weights import ModelWeights

KIND_PANELS = 2  # cpu_decode.c: a float32 PanelLinear (BLOCK_KINDS: GGUF block records)
GROUP_FIELDS = 6  # start, rows, rank, row_ranks, row_scales, the slot's table (cpu_decode.c)
LORA_FIELDS = 7  # a_panels, b_panels, c0, c1, members, r_max, bf16


def _no_weights() -> None:  # the weak reference of a missing (layer, group) entry
    return None


def _linear_row(linear) -> tuple[list[int], int | None] | None:
    """(kind, weights, bias) of a C linear, or of a SplitLinear's narrow side with its min_rows; else None."""
    if isinstance(linear, SplitLinear):
        narrow = _linear_row(linear.narrow)
        return None if narrow is None else (narrow[0], linear.min_rows)
    bias = linear.bias.data_ptr() if getattr(linear, "bias", None) is not None else 0
    if isinstance(linear, BlockLinear):
        return [BLOCK_KINDS[linear.kind], linear.records.data_ptr(), bias], None
    if isinstance(linear, PanelLinear):
        return [KIND_PANELS, linear.panels.data_ptr(), bias], None
    return None


class DecodeLayers:
    """The layers of `weights` as ml_decode_layers reads them; `forward` runs a decode-only step on them."""

    def __init__(self, ops: CKernelOps, weights: ModelWeights, kv: KVCache, layer_rows: list[list[int]], max_rows):
        self.ops, self.weights, self.kv = ops, weights, kv
        self.layers = torch.tensor(layer_rows, dtype=torch.long)
        s = weights.spec
        self.dims = torch.tensor([s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size])
        self.max_rows = max_rows  # steps of more rows run llama.forward (None: any row count)
        # the LM head on the side the layers' linears take (a SplitLinear's narrow one)
        self.lm_head = weights.lm_head.narrow if isinstance(weights.lm_head, SplitLinear) else weights.lm_head
        self.row_floats = 2 * s.hidden_size + s.q_size + 2 * s.kv_size + s.q_size + 3 * s.intermediate_size
        self._scratch = torch.empty(0)
        self._lora_scratch = torch.empty(0)
        self._slot_tables: dict[int, tuple[list, torch.Tensor]] = {}

    @classmethod
    def build(cls, ops, weights: ModelWeights, kv: KVCache) -> DecodeLayers | None:
        """DecodeLayers where ops are the C kernels and every layer's linears are C linears, else None."""
        if not isinstance(ops, CKernelOps) or kv.cache.dtype not in (torch.float32, torch.bfloat16):
            return None
        rows, bounds = [], []
        for lw in weights.layers:
            if not (lw.input_norm.is_contiguous() and lw.post_norm.is_contiguous()):
                return None
            row = [lw.input_norm.data_ptr(), lw.post_norm.data_ptr()]
            for linear in (lw.qkv, lw.o, lw.gate_up, lw.down):
                found = _linear_row(linear)
                if found is None:
                    return None
                row += found[0]
                if found[1] is not None:
                    bounds.append(found[1] - 1)
            rows.append(row)
        # A SplitLinear's narrow side serves its rows below min_rows; here also up to the int8 row bound,
        # where the blocks on int8 activations tie bf16 (VNNI) and the step saves its ~400 Python calls.
        max_rows = max(min(bounds) - 1, ops.lib.ml_blocks_max_int8_rows()) if bounds else None
        return cls(ops, weights, kv, rows, max_rows)

    def takes(self, meta: AttentionMeta, num_rows: int) -> bool:
        """Whether a step runs here: every row a decode token, and few enough rows for the narrow linears."""
        return (
            not meta.prefills
            and meta.decode is not None
            and meta.decode.rows.shape[0] == num_rows
            and (self.max_rows is None or num_rows <= self.max_rows)
        )

    def _buffer(self, name: str, size: int) -> torch.Tensor:
        buf = getattr(self, name)
        if buf.numel() < size:
            buf = torch.empty(max(size, 2 * buf.numel()))
            setattr(self, name, buf)
        return buf

    def _slot_table(self, table: list[dict[str, list]], slot: int) -> torch.Tensor:
        """[num_layers, 4, LORA_FIELDS] int64: the slot's PanelLoRA of each (layer, group), zeros where none."""
        entries = [layer[g][slot] for layer in table for g in GROUPS]
        cached = self._slot_tables.get(slot)
        if cached is not None and all(map(operator.is_, (ref() for ref in cached[0]), entries)):
            return cached[1]
        fields = []
        for w in entries:
            if w is None:
                fields.append([0] * LORA_FIELDS)
            elif isinstance(w, PanelLoRA):
                fields.append([*w.pointers, w.num_members, w.r_max, int(w.bf16)])
            else:
                raise TypeError(f"DecodeLayers reads PanelLoRA weights (CKernelOps.pack_lora), got {type(w).__name__}")
        tensor = torch.tensor(fields, dtype=torch.long)
        # weak references: an unloaded adapter's weights are freed at once, and a table whose weights are
        # gone (or replaced) fails the check above before its addresses are read
        self._slot_tables[slot] = ([_no_weights if w is None else weakref.ref(w) for w in entries], tensor)
        return tensor

    def _group_rows(self, groups: list[LoRAGroup], table) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The step's LoRA groups as ml_decode_layers reads them, and the LoRA scratch they need (floats)."""
        rows, scales, need = [], [], 0
        for g in groups:
            n = g.end - g.start
            rows.append(
                [
                    g.start,
                    n,
                    g.rank,
                    0 if g.row_ranks is None else g.row_ranks.data_ptr(),
                    0 if g.row_scales is None else g.row_scales.data_ptr(),
                    self._slot_table(table, g.slot).data_ptr(),
                ]
            )
            scales.append(g.scale)
            need = max(need, 2 * n * 3 * g.rank)  # 3: the most members a group fuses (q, k, v)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(scales, dtype=torch.float32), need

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMeta, groups: list[LoRAGroup], table: list | None
    ) -> torch.Tensor:
        """input_ids [T] of T decode tokens -> logits [len(meta.sample_rows), vocab]; writes their K/V."""
        w, kv, spec = self.weights, self.kv, self.weights.spec
        x = w.embed.index_select(0, input_ids)
        rows = x.shape[0]
        if groups and table is not None:
            group_rows, scales, lora_floats = self._group_rows(groups, table)
        else:
            group_rows, scales, lora_floats = torch.empty((0, GROUP_FIELDS), dtype=torch.long), torch.empty(0), 0
        scratch = self._buffer("_scratch", rows * self.row_floats)
        lora_scratch = self._buffer("_lora_scratch", max(lora_floats, 1))
        cache = kv.cache
        status = self.ops.lib.ml_decode_layers(
            x.data_ptr(),
            rows,
            spec.num_layers,
            self.layers.data_ptr(),
            self.dims.data_ptr(),
            spec.rms_norm_eps,
            cache.data_ptr(),
            cache.dtype == torch.bfloat16,
            cache.stride(0),
            cache.stride(1),
            cache.stride(2),
            kv.max_model_len,
            meta.slots.data_ptr(),
            meta.positions.data_ptr(),
            meta.decode.lengths.data_ptr(),
            meta.cos.data_ptr(),
            meta.sin.data_ptr(),
            group_rows.shape[0],
            group_rows.data_ptr(),
            scales.data_ptr(),
            kv.head_dim**-0.5,
            scratch.data_ptr(),
            lora_scratch.data_ptr(),
            self.ops.threads(),
        )
        if status != 0:
            raise MemoryError("ml_decode_layers: decode attention could not allocate its scratch buffers")
        x = self.ops.rms_norm(x.index_select(0, meta.sample_rows), w.norm, spec.rms_norm_eps)
        return self.lm_head(x)
