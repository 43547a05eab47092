"""inject_lora on the tiny Llama: which modules, what is frozen, and the model-wide helpers."""

import pytest
import torch

from matryoshka_lora.adapters import inject
from matryoshka_lora.adapters.layer import LoRALinear
from matryoshka_lora.adapters.p import build_p
from matryoshka_lora.errors import AdapterFormatError, ConfigError, TargetModuleError
from matryoshka_lora.models import model_fingerprint

TOKENS = torch.tensor([[5, 9, 17, 3, 44, 2], [7, 7, 100, 12, 1, 60]])


def randomize_B(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in inject.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)


@pytest.mark.parametrize(
    "targets, expected_per_layer",
    [(inject.DEFAULT_TARGET_MODULES, 7), (("q_proj", "v_proj"), 2), (("down_proj",), 1)],
)
def test_inject_wraps_the_targets_and_freezes_the_rest(tiny_model, targets, expected_per_layer):
    before = model_fingerprint(tiny_model)
    layers = inject.inject_lora(tiny_model, 4, target_modules=targets)
    assert len(layers) == 2 * expected_per_layer
    assert "model.layers.0.self_attn.q_proj" in layers or "q_proj" not in targets
    assert all(isinstance(m, LoRALinear) and tiny_model.get_submodule(n) is m for n, m in layers.items())
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{k}" for n in layers for k in "AB"}
    assert model_fingerprint(tiny_model) == before  # base weight names are unchanged
    assert inject.lora_layers(tiny_model) == layers


def test_a_target_that_matches_nothing_lists_the_linear_modules(tiny_model):
    with pytest.raises(TargetModuleError) as info:
        inject.inject_lora(tiny_model, 4, target_modules=("q_proj", "qkv"))
    assert info.value.given == ["qkv"]
    assert "lm_head" in info.value.allowed and "q_proj" in info.value.allowed


def test_injecting_twice_is_refused(tiny_model):
    inject.inject_lora(tiny_model, 4)
    with pytest.raises(ConfigError):
        inject.inject_lora(tiny_model, 4)


def test_seed_makes_the_init_reproducible(tiny_model):
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(tiny_model.config)
    inject.inject_lora(tiny_model, 4, seed=3)
    a = {k: v.clone() for k, v in inject.lora_state_dict(tiny_model).items()}
    inject.inject_lora(other, 4, seed=3)
    b = inject.lora_state_dict(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_adapter_equals_the_base_and_rank_zero_equals_the_base(tiny_model):
    with torch.no_grad():
        base_logits = tiny_model(TOKENS).logits
        inject.inject_lora(tiny_model, 4)
        torch.testing.assert_close(tiny_model(TOKENS).logits, base_logits)  # B = 0
        randomize_B(tiny_model)
        assert not torch.allclose(tiny_model(TOKENS).logits, base_logits)
        inject.set_inference_ranks(tiny_model, 0)
        torch.testing.assert_close(tiny_model(TOKENS).logits, base_logits)


def test_per_token_ranks_through_the_model_equal_each_sequence_alone(tiny_model):
    """Rows with a constant rank each: the batched per-token run equals running each row at its rank."""
    inject.inject_lora(tiny_model, 4, scaling="sqrt")
    randomize_B(tiny_model)
    ranks = torch.tensor([[1] * 6, [4] * 6])
    with torch.no_grad():
        inject.set_inference_ranks(tiny_model, ranks)
        batched = tiny_model(TOKENS).logits
        for row in range(2):
            inject.set_inference_ranks(tiny_model, int(ranks[row, 0]))
            torch.testing.assert_close(batched[row], tiny_model(TOKENS[row : row + 1]).logits[0], atol=1e-5, rtol=1e-5)


def test_set_p_reaches_every_layer_and_matches_inference_at_r_max(tiny_model):
    inject.inject_lora(tiny_model, 4, scaling="rank")
    randomize_B(tiny_model)
    with torch.no_grad():
        inject.set_p(tiny_model, build_p("dylora", 4, (1, 2, 4), "rank", sampled_rank=2))
        training = tiny_model(TOKENS).logits
        inject.set_inference_ranks(tiny_model, 2)
        torch.testing.assert_close(tiny_model(TOKENS).logits, training)


def test_state_dict_roundtrip_and_strictness(tiny_model):
    from transformers import LlamaForCausalLM

    inject.inject_lora(tiny_model, 4, seed=0)
    randomize_B(tiny_model)
    tensors = {k: v.clone() for k, v in inject.lora_state_dict(tiny_model).items()}
    assert all(k.endswith((".lora_A", ".lora_B")) for k in tensors) and len(tensors) == 28
    other = LlamaForCausalLM(tiny_model.config)
    inject.inject_lora(other, 4, seed=1)
    inject.load_lora_state_dict(other, tensors)
    assert all(torch.equal(inject.lora_state_dict(other)[k], v) for k, v in tensors.items())

    missing = dict(tensors)
    missing.pop("model.layers.1.mlp.down_proj.lora_B")
    wrong_shape = dict(tensors)
    wrong_shape["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(32, 8)
    extra = dict(tensors) | {"model.layers.9.self_attn.q_proj.lora_A": torch.zeros(32, 4)}
    for bad in (missing, wrong_shape, extra):
        with pytest.raises(AdapterFormatError):
            inject.load_lora_state_dict(other, bad)


def test_helpers_are_no_ops_without_lora_layers(tiny_model):
    inject.set_inference_ranks(tiny_model, 0)
    assert inject.lora_layers(tiny_model) == {} and inject.lora_state_dict(tiny_model) == {}
