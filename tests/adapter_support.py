"""Helpers of the adapter tests: a fresh tiny Llama and a random trained adapter on it (B non-zero)."""

from __future__ import annotations

import torch
from tiny_config import tiny_llama_config

from matryoshka_lora.adapters import inject, store
from matryoshka_lora.models import model_fingerprint, model_id

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fresh_tiny():
    """The 2-layer random Llama of the `tiny_model` fixture, as a plain call (several per test)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.config.name_or_path = "tiny-llama"
    return model.eval()


def random_adapter(method="matryoshka", scaling="none", alpha=2.0, r_max=8, targets=ALL_TARGETS, b_std=0.2):
    """(model with the adapter injected, the Adapter holding its weights): train ranks (1, 2, 4, 8), A as
    initialised with seed 0, B drawn with seed 1 times `b_std`."""
    model = fresh_tiny()
    manifest = store.AdapterManifest(
        name="t",
        base_model=model_id(model),
        base_fingerprint=model_fingerprint(model),
        target_modules=targets,
        r_max=r_max,
        train_ranks=(1, 2, 4, 8),
        scaling=scaling,
        method=method,
        alpha=alpha,
    )
    inject.inject_lora(model, r_max, scaling, targets, alpha, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in inject.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * b_std)
    return model, store.adapter_from_model(model, manifest)
