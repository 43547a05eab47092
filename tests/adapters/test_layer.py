"""LoRALinear: training forward with p, per-token-rank inference == per-row and masked references."""

import math

import pytest
import torch
from torch import nn

from matryoshka_lora.adapters.layer import LoRALinear
from matryoshka_lora.adapters.p import build_p, rank_scale
from matryoshka_lora.errors import ConfigError, InvalidRankError

R_MAX = 8


def make_layer(scaling="none", alpha=1.0, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(12, 10, bias=bias), R_MAX, scaling, alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def masked_reference(layer, x, ranks):
    """base + alpha * s_r * ((x @ (A * mask_r)) @ B) per token, with mask_r keeping the first r columns."""
    out = layer.base_forward(x).clone()
    flat_x, flat_r, flat_out = x.reshape(-1, 12), ranks.reshape(-1), out.view(-1, 10)
    for t in range(flat_x.shape[0]):
        r = int(flat_r[t])
        if r:
            mask = (torch.arange(R_MAX) < r).to(layer.lora_A.dtype)
            flat_out[t] += (
                layer.alpha * rank_scale(r, layer.scaling) * (flat_x[t] @ (layer.lora_A * mask)) @ layer.lora_B
            )
    return out


def test_init_matches_peft_and_freezes_the_base():
    base = nn.Linear(12, 10)
    layer = LoRALinear(base, R_MAX)
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert layer.lora_A.shape == (12, R_MAX) and layer.lora_B.shape == (R_MAX, 10)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.weight is base.weight and not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert "lora_p" not in layer.state_dict() and set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), base(x))  # zero B: the base


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_training_forward_uses_p(scaling, alpha):
    layer = make_layer(scaling, alpha)
    x = torch.randn(2, 3, 12)
    p = build_p("matryoshka", R_MAX, (1, 2, 4, 8), scaling)
    layer.set_p(p)
    expected = layer.base_forward(x) + alpha * ((x @ layer.lora_A) * p) @ layer.lora_B
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_default_p_is_plain_lora_at_r_max(scaling):
    layer = make_layer(scaling, alpha=2.0)
    x = torch.randn(4, 12)
    training = layer(x)
    layer.set_inference_ranks(R_MAX)
    torch.testing.assert_close(training, layer(x))


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
@pytest.mark.parametrize("bias", [True, False])
def test_per_token_ranks_equal_each_row_alone_and_the_masked_reference(scaling, bias):
    layer = make_layer(scaling, alpha=1.5, bias=bias)
    x = torch.randn(3, 5, 12)
    ranks = torch.tensor([[0, 1, 8, 3, 3], [8, 8, 2, 0, 5], [1, 1, 1, 1, 1]])
    layer.set_inference_ranks(ranks)
    out = layer(x)
    torch.testing.assert_close(out, masked_reference(layer, x, ranks))
    for b in range(3):
        for t in range(5):
            layer.set_inference_ranks(int(ranks[b, t]))
            torch.testing.assert_close(out[b, t], layer(x[b, t : t + 1])[0])


def test_rank_zero_is_the_base():
    layer = make_layer()
    x = torch.randn(4, 12)
    layer.set_inference_ranks(0)
    torch.testing.assert_close(layer(x), layer.base_forward(x))
    layer.set_inference_ranks(torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(layer(x), layer.base_forward(x))


@pytest.mark.parametrize("ranks", [-1, R_MAX + 1, True, 2.0, torch.tensor([1, 9]), torch.tensor([-1, 0])])
def test_invalid_ranks_are_refused(ranks):
    layer = make_layer()
    with pytest.raises(ConfigError) as info:
        layer.set_inference_ranks(ranks)
    if not isinstance(ranks, bool) and not isinstance(ranks, float):
        assert isinstance(info.value, InvalidRankError)


def test_per_token_ranks_must_match_the_tokens():
    layer = make_layer()
    layer.set_inference_ranks(torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match="shape"):
        layer(torch.randn(4, 12))


def test_set_p_checks_the_shape():
    with pytest.raises(ConfigError):
        make_layer().set_p(torch.ones(R_MAX + 1))


@pytest.mark.parametrize("rank", [0, 1, 5, R_MAX])
def test_merged_delta_weight_matches_the_forward(rank):
    layer = make_layer("sqrt", alpha=3.0)
    x = torch.randn(6, 12)
    layer.set_inference_ranks(rank)
    torch.testing.assert_close(layer(x), layer.base_forward(x) + x @ layer.merged_delta_weight(rank).T)


@pytest.mark.parametrize("kwargs", [dict(r_max=0), dict(scaling="log"), dict(alpha=0.0), dict(alpha=float("nan"))])
def test_constructor_rejects(kwargs):
    args = dict(r_max=4, scaling="none", alpha=1.0) | kwargs
    with pytest.raises(ConfigError):
        LoRALinear(nn.Linear(3, 3), **args)
