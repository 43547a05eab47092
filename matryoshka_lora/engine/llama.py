"""The Llama-family forward as plain functions over a flat token batch (gpt-fast style).

    x = embed[input_ids]                                         [T, hidden]
    for each layer:
        h = rms_norm(x);  qkv = h @ W_qkv (+ b) (+ LoRA_qkv(h))      (each W a frozen Linear: weights.py)
        q, k = rope(q, k);  cache <- k, v;  a = attention(q, cache)
        x = x + a @ W_o (+ LoRA_o(a))
        h = rms_norm(x);  gu = h @ W_gate_up (+ LoRA_gate_up(h))
        m = silu(gate) * up;  x = x + m @ W_down (+ LoRA_down(m))
    logits = rms_norm(x[sample_rows]) @ lm_head                  [N, vocab]
`lora` is anything with `apply(y, x, layer, group)` adding the per-token LoRA delta to y in place
(see lora_batch.LoRABatch); None serves the base model. `ops` supplies rms_norm, RoPE + cache write,
decode attention and silu-mul: torch_ops.TorchOps (the reference) or cpu_kernels.CKernelOps (fused C).
"""

from __future__ import annotations

from typing import Protocol

import torch

from matryoshka_lora.engine.attention import AttentionMeta, attention
from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.torch_ops import TorchOps
from matryoshka_lora.engine.weights import LayerWeights, ModelWeights

TORCH_OPS = TorchOps()


class LoRAApplier(Protocol):
    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None: ...


def attention_block(
    h: torch.Tensor,
    lw: LayerWeights,
    layer: int,
    w: ModelWeights,
    meta: AttentionMeta,
    kv: KVCache,
    lora: LoRAApplier | None,
    ops: TorchOps,
) -> torch.Tensor:
    qkv = lw.qkv(h)
    if lora is not None:
        lora.apply(qkv, h, layer, "qkv")
    q, k, v = ops.rope_and_cache(qkv, w.spec, layer, meta, kv)
    a = attention(q, k, v, layer, meta, kv, ops).view(h.shape[0], w.spec.q_size)
    out = lw.o(a)
    if lora is not None:
        lora.apply(out, a, layer, "o")
    return out


def mlp_block(h: torch.Tensor, lw: LayerWeights, layer: int, lora: LoRAApplier | None, ops: TorchOps) -> torch.Tensor:
    gu = lw.gate_up(h)
    if lora is not None:
        lora.apply(gu, h, layer, "gate_up")
    m = ops.silu_mul(gu)
    out = lw.down(m)
    if lora is not None:
        lora.apply(out, m, layer, "down")
    return out


def forward(
    w: ModelWeights,
    input_ids: torch.Tensor,
    meta: AttentionMeta,
    kv: KVCache,
    lora: LoRAApplier | None = None,
    ops: TorchOps = TORCH_OPS,
) -> torch.Tensor:
    """input_ids [T] -> logits [len(meta.sample_rows), vocab]; writes this step's K/V into `kv`."""
    eps = w.spec.rms_norm_eps
    x = w.embed.index_select(0, input_ids)
    for i, lw in enumerate(w.layers):
        x.add_(attention_block(ops.rms_norm(x, lw.input_norm, eps), lw, i, w, meta, kv, lora, ops))
        x.add_(mlp_block(ops.rms_norm(x, lw.post_norm, eps), lw, i, lora, ops))
    x = ops.rms_norm(x.index_select(0, meta.sample_rows), w.norm, eps)
    return w.lm_head(x)
