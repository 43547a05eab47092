"""PEFT interop: an exported rank-R slice loads in PEFT with the same logits; an SVD import reproduces
a PEFT adapter at full rank and is the Eckart-Young optimum at every lower rank."""

import json

import pytest
import torch
from adapter_support import ALL_TARGETS as TARGETS
from adapter_support import fresh_tiny, random_adapter

from matryoshka_lora.adapters import inject, peft_io, store
from matryoshka_lora.errors import AdapterFormatError, ConfigError, InvalidRankError

TOKENS = torch.tensor([[5, 9, 17, 3, 44, 2, 90], [1, 77, 8, 8, 120, 64, 33]])


@pytest.mark.parametrize("scaling", ["none", "rank", "sqrt"])
def test_exported_slice_loads_in_peft_with_the_same_logits(scaling, tmp_path):
    from peft import PeftModel

    model, adapter = random_adapter(scaling=scaling)
    for rank in (1, 3, 8):
        out = peft_io.export_peft(adapter, rank, tmp_path / f"r{rank}")
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == rank and config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
        assert sorted(config["target_modules"]) == sorted(TARGETS) and config["base_model_name_or_path"] == "tiny-llama"
        peft_model = PeftModel.from_pretrained(fresh_tiny(), str(out)).eval()
        with torch.no_grad():
            inject.set_inference_ranks(model, rank)
            torch.testing.assert_close(peft_model(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=1e-5)


def test_export_from_a_directory_and_rank_checks(tmp_path):
    _, adapter = random_adapter(scaling="none")
    store.save_adapter(tmp_path / "a", adapter.manifest, adapter.weights)
    out = peft_io.export_peft(tmp_path / "a", 2, tmp_path / "peft")
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    lora_A, lora_B = adapter.weights["model.layers.0.self_attn.q_proj"]
    assert torch.equal(tensors[f"{key}.lora_A.weight"], lora_A[:, :2].T)
    assert torch.equal(tensors[f"{key}.lora_B.weight"], lora_B[:2].T)
    for bad in (0, 9, 2.0):
        with pytest.raises(InvalidRankError):
            peft_io.export_peft(adapter, bad, tmp_path / "bad")


def make_peft_adapter(out, r=4, lora_alpha=16, **config_kwargs):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=["q_proj", "v_proj", "down_proj"],
        task_type="CAUSAL_LM",
        **config_kwargs,
    )
    peft_model = get_peft_model(fresh_tiny(), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(str(out))
    return peft_model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_import_at_full_rank_reproduces_the_peft_logits(use_rslora, tmp_path):
    peft_model = make_peft_adapter(tmp_path / "peft", use_rslora=use_rslora)
    adapter = peft_io.import_peft(tmp_path / "peft", tmp_path / "ours", fresh_tiny())
    m = adapter.manifest
    assert (m.method, m.scaling, m.alpha, m.r_max, m.target_modules) == (
        "svd",
        "none",
        1.0,
        4,
        ("down_proj", "q_proj", "v_proj"),
    )
    assert m.name == "peft" and store.load_adapter(tmp_path / "ours").manifest == m
    model = fresh_tiny()
    store.attach_adapter(model, store.load_adapter(tmp_path / "ours"))
    inject.set_inference_ranks(model, 4)
    with torch.no_grad():
        expected = peft_model(TOKENS).logits
        assert not torch.allclose(expected, fresh_tiny()(TOKENS).logits, atol=1e-3)
        torch.testing.assert_close(model(TOKENS).logits, expected, atol=1e-5, rtol=1e-5)


def test_truncation_error_is_the_eckart_young_optimum():
    generator = torch.Generator().manual_seed(0)
    r, factor = 6, 1.7
    peft_A, peft_B = torch.randn(r, 20, generator=generator), torch.randn(30, r, generator=generator)
    delta = factor * peft_B.double() @ peft_A.double()
    singular = torch.linalg.svdvals(delta)
    lora_A, lora_B = peft_io.svd_factors(peft_A, peft_B, factor, r)
    errors = []
    for k in range(r + 1):
        approx = (lora_A[:, :k].double() @ lora_B[:k].double()).T
        errors.append(torch.linalg.matrix_norm(delta - approx).item())
        optimum = singular[k:].square().sum().sqrt().item()
        assert errors[-1] == pytest.approx(optimum, rel=1e-4, abs=1e-4)
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-4


def test_svd_factors_pad_beyond_the_rank_of_the_delta():
    peft_A, peft_B = torch.randn(8, 3), torch.randn(5, 8)  # delta has rank <= 3
    lora_A, lora_B = peft_io.svd_factors(peft_A, peft_B, 1.0, 8)
    assert lora_A.shape == (3, 8) and lora_B.shape == (8, 5)
    torch.testing.assert_close((lora_A @ lora_B).T, peft_B @ peft_A, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(lora_A[:, 3:]) == 0


@pytest.mark.parametrize(
    "edit, error",
    [
        ({"use_dora": True}, ConfigError),
        ({"bias": "all"}, ConfigError),
        ({"peft_type": "IA3"}, ConfigError),
        ({"rank_pattern": {"q_proj": 2}}, ConfigError),
        ({"modules_to_save": ["lm_head"]}, ConfigError),
        ({"r": 0}, ConfigError),
        ({"r": 8}, AdapterFormatError),
    ],
)
def test_import_refuses_what_lora_cannot_express(tmp_path, edit, error):
    make_peft_adapter(tmp_path / "peft")
    file = tmp_path / "peft" / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | edit))
    with pytest.raises(error):
        peft_io.import_peft(tmp_path / "peft", tmp_path / "ours", fresh_tiny())
    assert not (tmp_path / "ours").exists()


def test_import_refuses_missing_files_and_foreign_modules(tmp_path):
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        peft_io.import_peft(tmp_path, tmp_path / "ours", fresh_tiny())
    make_peft_adapter(tmp_path / "peft")
    from tiny_config import tiny_llama_config
    from transformers import LlamaForCausalLM

    one_layer = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1))
    with pytest.raises(AdapterFormatError, match="does not exist"):
        peft_io.import_peft(tmp_path / "peft", tmp_path / "ours", one_layer)
