"""Next-token choice per sequence: greedy, temperature, top-p, each with its own seeded generator.

    greedy (temperature 0):  argmax(logits)
    otherwise:               p = softmax(logits / T); keep the smallest prefix of p sorted descending
                             whose mass reaches top_p; sample from it with the sequence's generator
A sequence's samples depend only on its own logits and generator, so a seeded request gives the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from matryoshka_lora.engine.torch_ops import TorchOps
from matryoshka_lora.types import SamplingParams

NUCLEUS_CANDIDATES = 1024  # look for the nucleus among the top-k first: a full vocabulary sort is slow


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of a probability vector outside the top-p nucleus (always keeps the top token).

    Exact: the top-k candidates are used only when their mass already reaches top_p, else all are sorted.
    """
    if top_p >= 1.0:
        return probs
    k = min(NUCLEUS_CANDIDATES, probs.numel())
    values, order = probs.topk(k)
    cum = values.cumsum(0)
    if cum[-1] < top_p and k < probs.numel():
        values, order = probs.sort(descending=True)
        cum = values.cumsum(0)
    keep = (cum - values) < top_p
    return torch.zeros_like(probs).index_put_((order[keep],), values[keep])


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Sample from softmax(logits / T) (top-p filtered) with the exponential race:
    argmax(p_i / E_i), E_i ~ Exp(1) i.i.d., picks i with probability p_i (one cheap pass, no cumsum)."""
    if params.temperature <= 0 or generator is None:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return int((probs / noise).argmax())


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    argmax_rows: Callable[[torch.Tensor], list[int]] = TorchOps.argmax_rows,
) -> list[int]:
    """logits [N, vocab] -> one token per row; greedy rows share one argmax_rows call (the engine passes its
    ops' fused one: TorchOps.argmax_rows semantics)."""
    greedy = argmax_rows(logits)
    return [
        greedy[i] if p.temperature <= 0 or g is None else sample_one(logits[i], p, g)
        for i, (p, g) in enumerate(zip(params, generators))
    ]
