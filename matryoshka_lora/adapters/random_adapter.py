"""Random adapters with non-zero A and B, so that every rank gives a different model (tests, benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from matryoshka_lora.adapters.inject import DEFAULT_TARGET_MODULES
from matryoshka_lora.adapters.p import default_train_ranks
from matryoshka_lora.adapters.store import AdapterManifest, save_adapter


def random_adapter_weights(
    hf_model: torch.nn.Module, r_max: int, target_modules=DEFAULT_TARGET_MODULES, seed: int = 0, std: float = 0.05
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A [in, r_max] ~ N(0, 1/in), B [r_max, out] ~ N(0, std^2)) for each targeted Linear."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in sorted(hf_model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            a = torch.randn(module.in_features, r_max, generator=gen) / module.in_features**0.5
            b = torch.randn(r_max, module.out_features, generator=gen) * std
            weights[name] = (a, b)
    return weights


def save_random_adapter(
    hf_model: torch.nn.Module,
    out_dir: str | os.PathLike,
    name: str,
    r_max: int,
    scaling: str = "none",
    alpha: float = 1.0,
    target_modules=DEFAULT_TARGET_MODULES,
    seed: int = 0,
    std: float = 0.05,
    train_ranks: tuple[int, ...] | None = None,
    eval_results: dict | None = None,
) -> Path:
    """Write a random Matryoshka-format adapter for `hf_model` to `out_dir` (train ranks: the powers of two
    up to r_max unless given); returns the directory."""
    from matryoshka_lora.models import model_fingerprint, model_id

    manifest = AdapterManifest(
        name=name,
        base_model=model_id(hf_model),
        base_fingerprint=model_fingerprint(hf_model),
        target_modules=tuple(target_modules),
        r_max=r_max,
        train_ranks=tuple(train_ranks) if train_ranks is not None else default_train_ranks(r_max),
        scaling=scaling,
        method="matryoshka",
        alpha=alpha,
        notes="random weights (tests / benchmarks)",
        eval_results=eval_results,
    )
    save_adapter(out_dir, manifest, random_adapter_weights(hf_model, r_max, target_modules, seed, std))
    return Path(out_dir)
