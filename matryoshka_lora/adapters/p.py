"""The fixed diagonal p between the LoRA factors: the only thing the three training methods change.

A LoRA-wrapped linear computes `y = base(x) + alpha * ((x @ A) * p) @ B` with A [in, r_max],
B [r_max, out] and p [r_max] fixed (not trained). With s_r the rank scale (`rank_scale`) and S the
sorted set of train ranks:

    lora:        p_i = s_{r_max}                         every column always on (plain LoRA at r_max)
    dylora:      p_i = s_b if i < b else 0               b = this step's sampled rank, b in S
    matryoshka:  p_i = sum_{r in S, r > i} s_r           (0-based i) one pass trains every r in S
    matryoshka-binary:  p_i = (1/|S|) sum_{r in S, r > i} s_r    the authors' "binary" masks (their mean)

The matryoshka p makes one forward pass equal to the SUM of the rank-r sub-adapters' outputs
(`s_r * x A[:, :r] B[:r]`) over r in S, i.e. |S| times the mean of the "binary" (masked) form
`binary_matryoshka_delta`. The training objective is therefore the sum of the per-rank losses'
first-order terms, at the cost of a single rank-r_max pass. `matryoshka-binary` trains that mean
itself (the authors' `mask_type="binary"`), computed as the same single pass with p / |S|.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from matryoshka_lora.errors import ConfigError, check_count

Method = Literal["lora", "dylora", "matryoshka", "matryoshka-binary"]
Scaling = Literal["none", "rank", "sqrt"]
METHODS: tuple[str, ...] = get_args(Method)
SCALINGS: tuple[str, ...] = get_args(Scaling)


def check_scaling(scaling: str) -> str:
    if scaling not in SCALINGS:
        raise ConfigError("scaling", scaling, list(SCALINGS))
    return scaling


def check_r_max(r_max: int) -> int:
    return check_count("r_max", r_max)


def rank_scale(rank: int, scaling: str) -> float:
    """s_r: `none` -> 1, `rank` -> 1/r, `sqrt` -> 1/sqrt(r). Defined for r >= 1."""
    check_scaling(scaling)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError("rank", rank, "an integer >= 1")
    if scaling == "none":
        return 1.0
    return 1.0 / rank if scaling == "rank" else 1.0 / math.sqrt(rank)


def served_scale(rank: int, scaling: str, alpha: float = 1.0, rank_scales: dict[int, float] | None = None) -> float:
    """alpha * s_rank * c_rank: the factor of the rank-r update as every backend serves it, with c_rank the
    adapter's fitted per-rank serving scale (`rank_scales`, 1 for a rank not listed)."""
    return alpha * rank_scale(rank, scaling) * (rank_scales or {}).get(rank, 1.0)


def default_train_ranks(r_max: int) -> tuple[int, ...]:
    """Powers of two up to r_max, plus r_max itself: 16 -> (1, 2, 4, 8, 16); 12 -> (1, 2, 4, 8, 12)."""
    check_r_max(r_max)
    ranks, r = [], 1
    while r <= r_max:
        ranks.append(r)
        r *= 2
    return tuple(sorted(set(ranks) | {r_max}))


def normalize_train_ranks(train_ranks, r_max: int) -> tuple[int, ...]:
    """Drop ranks above r_max, sort, dedupe. ConfigError if a rank is < 1 (or not an int) or none is left."""
    check_r_max(r_max)
    given = list(train_ranks)
    for r in given:
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ConfigError("train rank", r, "integers >= 1")
    kept = tuple(sorted({r for r in given if r <= r_max}))
    if not kept:
        raise ConfigError("train_ranks", given, f"at least one rank in 1..r_max={r_max}")
    return kept


def build_p(method: str, r_max: int, train_ranks, scaling: str, sampled_rank: int | None = None) -> torch.Tensor:
    """The diagonal p (float32, shape [r_max]) of `method`; see the module docstring for the formulas."""
    if method not in METHODS:
        raise ConfigError("method", method, list(METHODS))
    check_scaling(scaling)
    ranks = normalize_train_ranks(train_ranks, r_max)
    p = torch.zeros(r_max, dtype=torch.float32)
    if method == "lora":
        p[:] = rank_scale(r_max, scaling)
    elif method == "dylora":
        if sampled_rank not in ranks:
            raise ConfigError("dylora sampled_rank", sampled_rank, list(ranks))
        p[:sampled_rank] = rank_scale(sampled_rank, scaling)
    else:
        for r in ranks:
            p[:r] += rank_scale(r, scaling)
        if method == "matryoshka-binary":
            p /= len(ranks)
    return p


def sample_dylora_rank(train_ranks, generator: torch.Generator) -> int:
    """One rank drawn uniformly from `train_ranks` (already normalized) with `generator`: reproducible."""
    ranks = tuple(train_ranks)
    if not ranks:
        raise ConfigError("train_ranks", ranks, "at least one rank")
    index = int(torch.randint(len(ranks), (1,), generator=generator).item())
    return int(ranks[index])


def binary_matryoshka_delta(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, train_ranks, scaling: str
) -> torch.Tensor:
    """The "binary" Matryoshka form, for comparison: the mean over r in S of the masked sub-adapters,

        mean_{r in S} s_r * (x @ A[:, :r]) @ B[:r]

    It equals the diagonal form `((x @ A) * build_p("matryoshka", ...)) @ B` divided by |S|, which is
    `build_p("matryoshka-binary", ...)`'s diagonal form.
    """
    ranks = normalize_train_ranks(train_ranks, lora_A.shape[1])
    total = sum(rank_scale(r, scaling) * ((x @ lora_A[:, :r]) @ lora_B[:r]) for r in ranks)
    return total / len(ranks)
