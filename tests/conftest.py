"""Shared fixtures: a tiny random Llama for speed, and the real default model where behaviour matters."""

from __future__ import annotations

import pytest
import torch
from tiny_config import tiny_llama_config


@pytest.fixture
def tiny_model():
    """A 2-layer random Llama (float32, eval mode), fresh for each test."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.config.name_or_path = "tiny-llama"
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Llama with a real tokenizer (the default model's), for code that loads a directory."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from matryoshka_lora.models import default_model_dir

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct (float32), loaded once per session. Do not mutate it."""
    from matryoshka_lora.models import load_base_model

    return load_base_model()
