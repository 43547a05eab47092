"""The base model's linears as the GGUF file stores them: its Q4_1 / Q8_0 blocks, checked against the float weights.

    blocks = read_blocks(gguf_path, hf_model)      # {HF parameter name: BlockWeight}, only exact matches

A block of 32 weights along the input dimension k decodes as (blk = k // 32)

    Q4_1:  W[n, k] = d[n, blk] * q[n, k] + m[n, blk]      q in 0..15, d and m float16 in the file
    Q8_0:  W[n, k] = d[n, blk] * q[n, k]                  q in -127..127

`BlockWeight` keeps d and m widened to float32 and q one byte per weight, in nn.Linear's [out, in] row
order: llama.cpp stores q_proj / k_proj rows permuted for its rope, and the inverse permutation that
transformers applies when it dequantises (`_reverse_permute_weights`) is applied to the rows here.
Every tensor is then decoded and compared bit for bit with the float32 weight the model was loaded
with; one that differs (another file, another converter) is left out and served in float32, so the
blocks are always the weights the float32 path computes with. Other GGUF types are left out too.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

BLOCK_K = 32
KINDS = {3: ("Q4_1", 20), 8: ("Q8_0", 34)}  # ggml type id -> (name, bytes per block of 32)
# GGUF metadata value types -> struct format of one scalar (8: string, 9: array are read apart)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True, eq=False)
class BlockWeight:
    """One [out, in] weight in blocks of 32 along in: q [out, in] (uint8 for Q4_1, int8 for Q8_0),
    d [out, in / 32] float32, m [out, in / 32] float32 (Q4_1 only)."""

    kind: str
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """W [out, in] float32, as the GGUF dequantiser computes it (d * q, then + m)."""
        out, in_features = self.q.shape
        w = self.d.unsqueeze(-1) * self.q.view(out, in_features // BLOCK_K, BLOCK_K).float()
        if self.m is not None:
            w = w + self.m.unsqueeze(-1)
        return w.view(out, in_features)

    def rows(self, index: torch.Tensor) -> BlockWeight:
        return BlockWeight(self.kind, self.q[index], self.d[index], None if self.m is None else self.m[index])


def concat(weights: list[BlockWeight]) -> BlockWeight | None:
    """Stack weights along out (a fused qkv / gate_up), or None unless all are blocks of one kind."""
    if not weights or any(w is None for w in weights) or len({w.kind for w in weights}) != 1:
        return None
    m = None if weights[0].m is None else torch.cat([w.m for w in weights])
    return BlockWeight(weights[0].kind, torch.cat([w.q for w in weights]), torch.cat([w.d for w in weights]), m)


def _parse(kind: str, raw: np.ndarray, shape: tuple[int, int]) -> BlockWeight:
    """raw [out, bytes per row] as GGUF stores a row: per block d f16 (, m f16), then the quants."""
    out, in_features = shape
    nkb = in_features // BLOCK_K
    blocks = raw.reshape(out, nkb, -1)
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16).astype(np.float32)[..., 0])
    if kind == "Q4_1":
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0])
        packed = torch.from_numpy(blocks[..., 4:].copy())  # byte i: element i (low nibble), i + 16 (high)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(out, in_features)
        return BlockWeight(kind, q.contiguous(), d, m)
    q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(out, in_features)
    return BlockWeight(kind, q.contiguous(), d, None)


def rope_rows(num_rows: int, num_heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permutation: hf_rows = gguf_rows[rope_rows(...)]."""
    half = num_rows // num_heads // 2
    return torch.arange(num_rows).view(num_heads, half, 2).transpose(1, 2).reshape(-1)


def _hf_name(gguf_name: str, tied: bool) -> list[str]:
    if gguf_name == "token_embd.weight":
        return ["lm_head.weight"] if tied else []
    if gguf_name == "output.weight":
        return ["lm_head.weight"]
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_TO_HF and parts[3] == "weight":
        return [f"model.layers.{parts[1]}.{GGUF_TO_HF[parts[2]]}.weight"]
    return []


class _Cursor:
    """Reads GGUF's little-endian header fields from a memory map."""

    def __init__(self, data: np.memmap):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        size = self.take("Q")
        self.pos += size
        return bytes(self.data[self.pos - size : self.pos]).decode("utf-8", "replace")

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.take("I"), self.take("Q")
            if item in SCALARS:  # skipped whole: only general.alignment is kept, a scalar
                self.pos += count * struct.calcsize(SCALARS[item])
                return None
            for _ in range(count):
                if item == 8:  # a string, skipped unread
                    size = self.take("Q")
                    self.pos += size
                else:
                    self.value(item)
            return None
        return self.take(SCALARS[kind])


def tensor_table(path: str | Path) -> dict[str, tuple[int, tuple[int, ...], np.ndarray]]:
    """{name: (ggml type id, dims innermost first, raw bytes)} of a GGUF v2/v3 file, memory-mapped.

    A small reader of the file's header (gguf.GGUFReader builds every metadata field, ~3 s for a
    49k-token vocabulary); the format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
    """
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(data)
    magic, version, num_tensors, num_kv = cur.take("4sIQQ")
    if magic != b"GGUF" or version < 2:
        raise ValueError(f"{path}: not a GGUF v2+ file (magic {magic!r}, version {version})")
    alignment = 32
    for _ in range(num_kv):
        key = cur.string()
        value = cur.value(cur.take("I"))
        if key == "general.alignment":
            alignment = int(value)
    infos = []
    for _ in range(num_tensors):
        name = cur.string()
        dims = tuple(cur.take("Q") for _ in range(cur.take("I")))
        infos.append((name, dims, cur.take("I"), cur.take("Q")))
    start = -(-cur.pos // alignment) * alignment
    table = {}
    for name, dims, kind, offset in infos:
        if kind in KINDS:
            rows = int(np.prod(dims[1:]))
            row_bytes = dims[0] // BLOCK_K * KINDS[kind][1]
            raw = data[start + offset : start + offset + rows * row_bytes].reshape(rows, row_bytes)
            table[name] = (kind, dims, raw)
    return table


def read_blocks(gguf_path: str | Path, hf_model: torch.nn.Module) -> dict[str, BlockWeight]:
    """The GGUF file's Q4_1 / Q8_0 linears keyed by HF parameter name, each equal bit for bit to hf_model's."""
    config = hf_model.config
    params = dict(hf_model.named_parameters())
    tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in params
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    found: dict[str, BlockWeight] = {}
    mismatched: list[str] = []
    for gguf_name, (kind_id, dims, raw) in tensor_table(gguf_path).items():
        names = _hf_name(gguf_name, tied)
        if not names or len(dims) != 2:
            continue
        shape = (int(dims[1]), int(dims[0]))  # GGUF lists dimensions innermost first
        weight = _parse(KINDS[kind_id][0], np.asarray(raw), shape)
        if ".attn_q." in gguf_name or ".attn_k." in gguf_name:
            weight = weight.rows(rope_rows(shape[0], num_heads if ".attn_q." in gguf_name else num_kv_heads))
        for name in names:
            reference = params.get(name)
            if name == "lm_head.weight" and reference is None:
                reference = hf_model.get_input_embeddings().weight
            if reference is not None and torch.equal(weight.dequantize(), reference.detach().float()):
                found[name] = weight
            else:
                mismatched.append(name)
    if mismatched:
        log.warning(
            "%d GGUF tensors do not match the loaded float weights and stay float32: %s",
            len(mismatched),
            ", ".join(mismatched[:4]),
        )
    log.info("%d linears served from %s's blocks", len(found), Path(gguf_path).name)
    return found
