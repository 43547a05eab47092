"""The step's small ops in plain PyTorch: the reference that the fused C kernels (cpu_kernels.py) must equal.

rms_norm(x, w, eps)                   x * rsqrt(mean(x^2, -1) + eps) * w
silu_mul(gu)                          silu(gu[:, :n]) * gu[:, n:]            (n = gu.shape[1] // 2)
rope_and_cache(qkv, spec, layer, ..)  q, k = rope(q, k) at each row's position; cache[layer] <- k, v;
                                      returns the views (q [T, heads, d], k, v [T, kv_heads, d])
decode_attention(q, layer, meta, kv, out)
                                      out[r] = attention of decode row r over its cache slot
                                      (attention.decode_attention); other rows of out untouched
lora_grouped_(y, x, groups, weights)  y += each group's per-row rank-r LoRA delta (lora_ops)
pack_linear(weight, bias, hint, blocks)
                                      the frozen linear the model's weights are stored as:
                                      y = x @ weight.T + bias (linear.PackedLinear here; blocks, the
                                      GGUF file's own form of weight, is for op sets that read it)
pack_lora(fused)                      an adapter group (lora_ops.FusedLoRA) in the layout lora_grouped_
                                      takes, the only copy the engine keeps (FusedLoRA itself here)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from matryoshka_lora.engine.attention import AttentionMeta, decode_attention
from matryoshka_lora.engine.gguf_weights import BlockWeight
from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.linear import PackedLinear
from matryoshka_lora.engine.lora_ops import FusedLoRA, lora_grouped_
from matryoshka_lora.engine.weights import ModelSpec


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d]; cos, sin [T, 1, d] -> x * cos + rotate_half(x) * sin (HF's convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


class TorchOps:
    name = "torch"
    lora_grouped_ = staticmethod(lora_grouped_)

    def pack_linear(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        batch_size_hint: int = 16,
        blocks: BlockWeight | None = None,
    ) -> PackedLinear:
        return PackedLinear(weight, bias, batch_size_hint)

    def pack_lora(self, w: FusedLoRA) -> FusedLoRA:
        """An adapter group as lora_grouped_ reads it (fuse_adapter calls it off the engine loop): the torch
        op reads FusedLoRA as it is."""
        return w

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        n = gu.shape[1] // 2
        return F.silu(gu[:, :n]).mul_(gu[:, n:])

    @staticmethod
    def argmax_rows(logits: torch.Tensor) -> list[int]:
        """logits [N, vocab] -> each row's argmax (the first index of its max; a NaN counts as the max)."""
        return logits.argmax(dim=-1).tolist()

    @staticmethod
    def split_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = qkv.shape[0]
        q = qkv[:, : spec.q_size].view(t, spec.num_heads, spec.head_dim)
        k = qkv[:, spec.q_size : spec.q_size + spec.kv_size].view(t, spec.num_kv_heads, spec.head_dim)
        v = qkv[:, spec.q_size + spec.kv_size :].view(t, spec.num_kv_heads, spec.head_dim)
        return q, k, v

    def rope_and_cache(self, qkv: torch.Tensor, spec: ModelSpec, layer: int, meta: AttentionMeta, kv: KVCache):
        t = qkv.shape[0]
        qk = qkv[:, : spec.q_size + spec.kv_size].view(t, spec.num_heads + spec.num_kv_heads, spec.head_dim)
        qk = apply_rope(qk, meta.cos, meta.sin)
        q, k = qk[:, : spec.num_heads], qk[:, spec.num_heads :]
        v = qkv[:, spec.q_size + spec.kv_size :].view(t, spec.num_kv_heads, spec.head_dim)
        kv.write(layer, meta.cache_rows, k, v)
        return q, k, v

    def decode_attention(
        self, q: torch.Tensor, layer: int, meta: AttentionMeta, kv: KVCache, out: torch.Tensor
    ) -> None:
        d = meta.decode
        kc, vc = kv.range_view(layer, d.lo, d.hi, d.length)
        if kc.dtype != q.dtype:  # a bfloat16 cache: its values widened (exactly) for the float32 matmuls
            kc, vc = kc.to(q.dtype), vc.to(q.dtype)
        out.index_copy_(0, d.rows, decode_attention(q.index_select(0, d.rows), kc, vc, d))
