"""The adapters the vLLM backend serves: read and validated here, exported per rank only on first use.

read_adapter(path)        manifest + weights validated (adapters.store.load_adapter), base model checked
                          by name (manifest base_model == the model directory's name) or by fingerprint
serve_adapter(loaded, R)  r_max and train ranks capped at vLLM's max_lora_rank R
adapter_info(served)      what list_adapters() reports (the capped r_max and ranks)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from matryoshka_lora.backends.vllm_loras import adapter_digest
from matryoshka_lora.errors import BaseModelMismatchError, ConfigError
from matryoshka_lora.types import AdapterInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter as the vLLM backend serves it: r_max and train_ranks capped at vLLM's max_lora_rank."""

    name: str
    path: str
    r_max: int
    train_ranks: tuple[int, ...]
    digest: str  # of the adapter's files (vllm_loras.adapter_digest)
    manifest: object = field(default=None, compare=False)  # adapters.store.AdapterManifest


def read_adapter(
    path: str | os.PathLike, name: str | None, model_name: str, fingerprint: str | None = None, check_name: bool = True
) -> ServedAdapter:
    """Validate an adapter directory fully; `name` renames it. With `fingerprint`, refuse another base model
    by weights; with `check_name`, by the manifest's base_model against `model_name`. The ranks are not
    capped yet (serve_adapter does that)."""
    from matryoshka_lora.adapters.store import NAME_PATTERN, load_adapter

    manifest = load_adapter(path, fingerprint).manifest
    if name is not None:
        if not NAME_PATTERN.match(name):
            raise ConfigError("adapter name", name, "1-64 characters of A-Z a-z 0-9 . _ -, not starting with . _ -")
        manifest.name = name
    if check_name and manifest.base_model != model_name:
        raise BaseModelMismatchError(manifest.name, f"{manifest.base_model} (by name)", f"{model_name} (by name)")
    return ServedAdapter(
        manifest.name, str(Path(path).resolve()), manifest.r_max, manifest.train_ranks, adapter_digest(path), manifest
    )


def serve_adapter(adapter: ServedAdapter, max_lora_rank: int) -> ServedAdapter:
    """Cap r_max and the train ranks at `max_lora_rank` (with a warning when that drops ranks)."""
    r_max = min(adapter.manifest.r_max, max_lora_rank)
    if r_max < adapter.manifest.r_max:
        log.warning(
            "adapter %r has r_max %d but vLLM runs with max_lora_rank %d: serving ranks 1..%d",
            adapter.name,
            adapter.manifest.r_max,
            max_lora_rank,
            r_max,
        )
    ranks = tuple(r for r in adapter.manifest.train_ranks if r <= r_max) or (r_max,)
    return ServedAdapter(adapter.name, adapter.path, r_max, ranks, adapter.digest, adapter.manifest)


def adapter_info(adapter: ServedAdapter) -> AdapterInfo:
    return AdapterInfo.of(adapter.name, adapter.manifest, adapter.path, adapter.r_max, adapter.train_ranks)


def base_fingerprint(model_dir: Path) -> str:
    """The weight fingerprint of a local HF model (loads it once on CPU: small models only)."""
    from matryoshka_lora.models import load_base_model, model_fingerprint

    model, _ = load_base_model(str(model_dir))
    return model_fingerprint(model)
