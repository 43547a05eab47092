"""The Llama-family forward as plain functions over a flat token batch (gpt-fast style).

    x = embed[input_ids]                                         [T, hidden]
    for each layer:
        h = rms_norm(x);  qkv = h @ W_qkv (+ b) (+ LoRA_qkv(h))      (each W a PackedLinear)
        q, k = rope(q, k);  cache <- k, v;  a = attention(q, cache)
        x = x + a @ W_o (+ LoRA_o(a))
        h = rms_norm(x);  gu = h @ W_gate_up (+ LoRA_gate_up(h))
        m = silu(gate) * up;  x = x + m @ W_down (+ LoRA_down(m))
    logits = rms_norm(x[sample_rows]) @ lm_head                  [N, vocab]
`lora` is anything with `apply(y, x, layer, group)` adding the per-token LoRA delta to y in place
(see lora_batch.LoRABatch); None serves the base model.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from matryoshka_lora.engine.attention import AttentionMeta, attention
from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.weights import LayerWeights, ModelWeights


class LoRAApplier(Protocol):
    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos, sin [T, 1, d] -> x * cos + rotate_half(x) * sin (HF's convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


def attention_block(
    h: torch.Tensor, lw: LayerWeights, layer: int, w: ModelWeights, meta: AttentionMeta, kv: KVCache, lora: LoRAApplier | None
) -> torch.Tensor:
    spec = w.spec
    num_tokens = h.shape[0]
    qkv = lw.qkv(h)
    if lora is not None:
        lora.apply(qkv, h, layer, "qkv")
    qk = qkv[:, : spec.q_size + spec.kv_size].view(num_tokens, spec.num_heads + spec.num_kv_heads, spec.head_dim)
    qk = apply_rope(qk, meta.cos, meta.sin)
    q, k = qk[:, : spec.num_heads], qk[:, spec.num_heads :]
    v = qkv[:, spec.q_size + spec.kv_size :].view(num_tokens, spec.num_kv_heads, spec.head_dim)
    a = attention(q, k, v, layer, meta, kv).reshape(num_tokens, spec.q_size)
    out = lw.o(a)
    if lora is not None:
        lora.apply(out, a, layer, "o")
    return out


def mlp_block(h: torch.Tensor, lw: LayerWeights, layer: int, lora: LoRAApplier | None) -> torch.Tensor:
    gu = lw.gate_up(h)
    if lora is not None:
        lora.apply(gu, h, layer, "gate_up")
    size = gu.shape[1] // 2
    m = F.silu(gu[:, :size]).mul_(gu[:, size:])
    out = lw.down(m)
    if lora is not None:
        lora.apply(out, m, layer, "down")
    return out


def forward(
    w: ModelWeights, input_ids: torch.Tensor, meta: AttentionMeta, kv: KVCache, lora: LoRAApplier | None = None
) -> torch.Tensor:
    """input_ids [T] -> logits [len(meta.sample_rows), vocab]; writes this step's K/V into `kv`."""
    eps = w.spec.rms_norm_eps
    x = w.embed.index_select(0, input_ids)
    for i, lw in enumerate(w.layers):
        x.add_(attention_block(rms_norm(x, lw.input_norm, eps), lw, i, w, meta, kv, lora))
        x.add_(mlp_block(rms_norm(x, lw.post_norm, eps), lw, i, lora))
    x = rms_norm(x.index_select(0, meta.sample_rows), w.norm, eps)
    return w.lm_head(x)
