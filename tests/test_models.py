"""models.py: the base fingerprint, clear errors for a bad model path, the converted default model."""

import pytest
import torch

from matryoshka_lora.errors import ModelNotFoundError
from matryoshka_lora.models import DEFAULT_MODEL_ID, model_fingerprint, model_id, resolve_model_dir


def tiny(seed, **overrides):
    from tiny_config import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def test_fingerprint_is_stable_and_tells_models_apart():
    a, a_again = tiny(0), tiny(0)
    fingerprint = model_fingerprint(a)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert model_fingerprint(a_again) == fingerprint == model_fingerprint(a)
    assert model_fingerprint(tiny(1)) != fingerprint
    assert model_fingerprint(tiny(0, intermediate_size=48)) != fingerprint
    with torch.no_grad():
        a.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # index 0 is always in the strided sample
    assert model_fingerprint(a) != fingerprint


def test_fingerprint_ignores_lora_layers():
    from matryoshka_lora.adapters import inject

    model = tiny(0)
    before = model_fingerprint(model)
    inject.inject_lora(model, 4)
    assert model_fingerprint(model) == before


@pytest.mark.parametrize(
    "make", [lambda p: p / "missing", lambda p: p, lambda p: (p / "f").write_text("x") and p / "f"]
)
def test_resolve_model_dir_refuses_a_non_model_path(tmp_path, make):
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face model directory"):
        resolve_model_dir(make(tmp_path))


def test_resolve_model_dir_accepts_a_saved_model(tiny_model_dir):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir


@pytest.mark.slow
def test_converted_default_model_loads_with_plain_from_pretrained(default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(None)
    assert path == resolve_model_dir(DEFAULT_MODEL_ID) == resolve_model_dir("default")
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert plain.config.model_type == "llama" and not hasattr(plain.config, "quantization_config")
    assert tokenizer.chat_template and model_id(plain) == DEFAULT_MODEL_ID
    model, _ = default_model
    assert model_fingerprint(plain) == model_fingerprint(model)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits)
