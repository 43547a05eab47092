"""prefill_attention: causal SDPA over a chunk equals the softmax written out, in float32 and (within
bfloat16's rounding of q, k, v) in bfloat16, from position 0 and from an offset into the cache."""

from __future__ import annotations

import pytest
import torch

from matryoshka_lora.engine.attention import prefill_attention


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: int) -> torch.Tensor:
    """The definition, in float64: q [n, heads, d]; k, v [kv_heads, position + n, d]."""
    n, heads, d = q.shape
    group = heads // k.shape[0]
    k, v = k.double().repeat_interleave(group, 0), v.double().repeat_interleave(group, 0)
    scores = torch.einsum("nhd,hcd->hnc", q.double(), k) / d**0.5
    allowed = torch.ones(n, k.shape[1], dtype=torch.bool).tril(diagonal=position)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hnc,hcd->nhd", probs, v)


@pytest.mark.parametrize("n, position", [(1, 0), (17, 0), (128, 0), (9, 40)])
@pytest.mark.parametrize("dtype, tolerance", [(None, 1e-5), (torch.bfloat16, 2e-2)], ids=["float32", "bf16"])
def test_prefill_attention_equals_the_softmax(n, position, dtype, tolerance):
    gen = torch.Generator().manual_seed(n + position)
    q = torch.randn(n, 9, 64, generator=gen)
    k, v = torch.randn(3, position + n, 64, generator=gen), torch.randn(3, position + n, 64, generator=gen)
    got = prefill_attention(q, k, v, position, dtype)
    want = softmax_attention(q, k, v, position)
    assert got.dtype == torch.float32 and got.shape == q.shape
    error = (got.double() - want).abs().max() / want.abs().max()
    assert error < tolerance
