"""build_p and friends: hand-computed diagonals, and the diagonal form == |S| x the binary form."""

import math

import pytest
import torch

from matryoshka_lora.adapters.p import (
    binary_matryoshka_delta,
    build_p,
    default_train_ranks,
    normalize_train_ranks,
    rank_scale,
    sample_dylora_rank,
)
from matryoshka_lora.errors import ConfigError


@pytest.mark.parametrize(
    "rank, scaling, expected",
    [(1, "none", 1.0), (8, "none", 1.0), (4, "rank", 0.25), (16, "sqrt", 0.25), (2, "sqrt", 1 / math.sqrt(2))],
)
def test_rank_scale(rank, scaling, expected):
    assert rank_scale(rank, scaling) == pytest.approx(expected)


@pytest.mark.parametrize("rank, scaling", [(0, "none"), (-1, "rank"), (2, "log"), (1.5, "none")])
def test_rank_scale_rejects(rank, scaling):
    with pytest.raises(ConfigError):
        rank_scale(rank, scaling)


@pytest.mark.parametrize(
    "r_max, expected", [(1, (1,)), (2, (1, 2)), (8, (1, 2, 4, 8)), (12, (1, 2, 4, 8, 12)), (16, (1, 2, 4, 8, 16))]
)
def test_default_train_ranks(r_max, expected):
    assert default_train_ranks(r_max) == expected


@pytest.mark.parametrize(
    "given, r_max, expected",
    [((8, 1, 4, 4, 32), 16, (1, 4, 8)), ([16], 16, (16,)), ((3, 2, 1), 2, (1, 2))],
)
def test_normalize_train_ranks(given, r_max, expected):
    assert normalize_train_ranks(given, r_max) == expected


@pytest.mark.parametrize("given, r_max", [((), 8), ((16, 32), 8), ((0, 2), 8), ((-1,), 8), ((1,), 0)])
def test_normalize_train_ranks_rejects(given, r_max):
    with pytest.raises(ConfigError):
        normalize_train_ranks(given, r_max)


@pytest.mark.parametrize(
    "method, r_max, ranks, scaling, sampled, expected",
    [
        ("lora", 4, (1, 2, 4), "none", None, [1, 1, 1, 1]),
        ("lora", 4, (1, 2, 4), "rank", None, [0.25] * 4),
        ("dylora", 4, (1, 2, 4), "none", 2, [1, 1, 0, 0]),
        ("dylora", 4, (1, 2, 4), "sqrt", 4, [0.5] * 4),
        ("matryoshka", 4, (1, 2, 4), "none", None, [3, 2, 1, 1]),
        ("matryoshka", 4, (1, 2, 4), "rank", None, [1.75, 0.75, 0.25, 0.25]),
        ("matryoshka-binary", 4, (1, 2, 4), "none", None, [1, 2 / 3, 1 / 3, 1 / 3]),
        ("matryoshka", 8, (2, 8), "sqrt", None, [1 / math.sqrt(2) + 1 / math.sqrt(8)] * 2 + [1 / math.sqrt(8)] * 6),
    ],
)
def test_build_p(method, r_max, ranks, scaling, sampled, expected):
    p = build_p(method, r_max, ranks, scaling, sampled_rank=sampled)
    assert p.dtype == torch.float32 and p.shape == (r_max,)
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize(
    "method, r_max, scaling, sampled",
    [
        ("qlora", 4, "none", None),
        ("lora", 0, "none", None),
        ("lora", 4, "log", None),
        ("dylora", 4, "none", None),
        ("dylora", 4, "none", 3),
    ],
)
def test_build_p_rejects(method, r_max, scaling, sampled):
    with pytest.raises(ConfigError) as info:
        build_p(method, r_max, (1, 2, 4), scaling, sampled_rank=sampled)
    assert info.value.allowed  # every error says what would be accepted


def test_sample_dylora_rank_is_seeded_and_covers_the_ranks():
    ranks = (1, 2, 4, 8)
    draws = [sample_dylora_rank(ranks, torch.Generator().manual_seed(s)) for s in range(64)]
    again = [sample_dylora_rank(ranks, torch.Generator().manual_seed(s)) for s in range(64)]
    assert draws == again
    assert set(draws) == set(ranks)


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
@pytest.mark.parametrize("ranks", [(1, 2, 4, 8), (3, 8), (8,)])
def test_diagonal_form_equals_binary_form_times_num_ranks(scaling, ranks):
    torch.manual_seed(0)
    x, lora_A, lora_B = torch.randn(5, 6), torch.randn(6, 8), torch.randn(8, 7)
    diagonal = ((x @ lora_A) * build_p("matryoshka", 8, ranks, scaling)) @ lora_B
    binary = binary_matryoshka_delta(x, lora_A, lora_B, ranks, scaling)
    torch.testing.assert_close(diagonal / len(ranks), binary)
    one_pass = ((x @ lora_A) * build_p("matryoshka-binary", 8, ranks, scaling)) @ lora_B
    torch.testing.assert_close(one_pass, binary)
