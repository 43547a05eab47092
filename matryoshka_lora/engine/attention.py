"""Attention over the slot KV cache for a flat token batch, and its per-step metadata.

A step's tokens are rows of one [T, ...] batch. Each row belongs either to a prefill chunk (a run of
consecutive prompt tokens of one sequence) or is the single decode token of a running sequence.

    prefill chunk (slot s, positions p..p+n-1):
        out[i] = softmax(q[i] . K[s, :p+i+1]^T / sqrt(d)) V[s, :p+i+1]      (causal)
    decode token of slot s at position p:
        out = softmax(q . K[s, :p+1]^T / sqrt(d)) V[s, :p+1]
Prefill chunks run SDPA in `AttentionMeta.prefill_dtype`: float32, or bfloat16 on the "gguf+bf16"
weight format (q, k and v rounded to bf16, the softmax accumulated in float32 by the kernel, the output
widened back; ~2.5x faster from a few hundred tokens, the same rounding as that format's wide linears).
The reference decode path (`decode_attention`, used by torch_ops.TorchOps) does all decode tokens in one
batched matmul over the slot range [lo, hi) as cache views; the rows of slots in that range that are
not decoding are computed on a dummy mask and dropped. The fused C kernel (cpu_kernels.c) reads each
sequence's own positions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from matryoshka_lora.engine.kv_cache import KVCache

NEG_INF = float("-inf")


@dataclass(frozen=True)
class PrefillChunk:
    start: int  # first token row in the batch
    end: int  # one past the last row
    slot: int
    position: int  # position of the first token in its sequence


@dataclass
class DecodeMeta:
    rows: torch.Tensor  # [B] token rows of the decode tokens
    slots: torch.Tensor  # [B] their KV cache slots
    lengths: torch.Tensor  # [B] positions each attends to (incl. the new token)
    offsets: torch.Tensor  # [B] slot - lo for each decode row
    lo: int
    hi: int
    length: int  # max context length among decoding sequences (incl. the new token)
    mask: torch.Tensor  # [hi - lo, 1, 1, length] additive: 0 where attended, -inf elsewhere


@dataclass
class AttentionMeta:
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] KV cache slot of each row
    cache_rows: torch.Tensor  # [T * kv_heads] flat KV cache rows (KVCache.write_rows)
    cos: torch.Tensor  # [T, 1, head_dim]
    sin: torch.Tensor
    prefills: list[PrefillChunk]
    decode: DecodeMeta | None
    sample_rows: torch.Tensor  # [N] rows whose logits are needed
    prefill_dtype: torch.dtype = torch.float32  # what the prefill chunks' SDPA computes in


def build_decode_meta(rows: list[int], slots: list[int], lengths: list[int]) -> DecodeMeta:
    """Decode metadata for tokens at batch `rows`, in `slots`, each attending to `lengths[i]` positions."""
    lo, hi, length = min(slots), max(slots) + 1, max(lengths)
    mask = torch.full((hi - lo, 1, 1, length), NEG_INF)
    mask[:, :, :, 0] = 0.0  # rows of non-decoding slots: attend to position 0 only, result dropped
    for slot, n in zip(slots, lengths):
        mask[slot - lo, :, :, :n] = 0.0
    offsets = torch.tensor([s - lo for s in slots], dtype=torch.long)
    as_long = (torch.tensor(v, dtype=torch.long) for v in (rows, slots, lengths))
    return DecodeMeta(*as_long, offsets, lo, hi, length, mask)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """q [n, heads, d]; k, v [kv_heads, position + n, d] -> [n, heads, d], causal with offset `position`;
    computed in `dtype` (default q's), returned in q's."""
    n, ctx = q.shape[0], k.shape[1]
    dtype = q.dtype if dtype is None else dtype
    if dtype != q.dtype or k.dtype != dtype:  # (k, v read from a bfloat16 cache)
        return prefill_attention(q.to(dtype), k.to(dtype), v.to(dtype), position).to(q.dtype)
    qt, kt, vt = q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if position == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    else:
        mask = torch.ones(n, ctx, dtype=torch.bool).tril(diagonal=position)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: DecodeMeta) -> torch.Tensor:
    """q [B, heads, d] of the decode rows; k, v [hi - lo, kv_heads, length, d] cache views -> [B, heads, d].

    GQA without repeating K/V: the `heads // kv_heads` query heads sharing a KV head become extra query
    rows of that head, so one batched matmul serves them all.
    """
    num_slots, kv_heads, _, d = k.shape
    group = q.shape[1] // kv_heads
    qs = q.new_zeros(num_slots, kv_heads * group, d)
    qs.index_copy_(0, meta.offsets, q)
    qs = qs.view(num_slots, kv_heads, group, d)
    scores = torch.matmul(qs, k.transpose(-1, -2)).mul_(d**-0.5).add_(meta.mask)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v).view(num_slots, kv_heads * group, d)
    return out.index_select(0, meta.offsets)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, meta: AttentionMeta, kv: KVCache, ops
) -> torch.Tensor:
    """Attend every row; this step's k, v are already in the cache. q [T, heads, d] -> [T, heads, d].

    Prefill chunks go through SDPA; the decode rows through `ops.decode_attention` (torch_ops.TorchOps
    or the fused kernel of cpu_kernels.CKernelOps).
    """
    out = torch.empty(q.shape, dtype=q.dtype)
    for c in meta.prefills:
        if c.position == 0:
            kc, vc = k[c.start : c.end].transpose(0, 1), v[c.start : c.end].transpose(0, 1)
            out[c.start : c.end] = prefill_attention(q[c.start : c.end], kc, vc, 0, meta.prefill_dtype)
        else:
            kc, vc = kv.seq_view(layer, c.slot, c.position + c.end - c.start)
            out[c.start : c.end] = prefill_attention(q[c.start : c.end], kc, vc, c.position, meta.prefill_dtype)
    if meta.decode is not None:
        ops.decode_attention(q, layer, meta, kv, out)
    return out
