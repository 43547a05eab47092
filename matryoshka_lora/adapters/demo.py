"""The `demo` subcommand's work: one prompt, one adapter, greedy generation at several ranks.

model = load_base_model(...)
adapter = --adapter, else the first adapter in the top-level adapters/ folder made for this model
          (Matryoshka first), else a fresh one (random A, zero B: equal to the base at every rank)
for r in ranks: set_inference_ranks(model, r); generate greedily with the chat template
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from matryoshka_lora.adapters import inject, store
from matryoshka_lora.errors import AdapterFormatError

log = logging.getLogger(__name__)

FRESH_R_MAX = 16


def shipped_adapters_dir() -> Path:
    """The repository's top-level `adapters/` folder (next to the package in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "adapters"


def find_shipped_adapter(fingerprint: str, root: Path | None = None) -> store.Adapter | None:
    """The first valid adapter under `root` trained on this base model, Matryoshka ones first."""
    root = shipped_adapters_dir() if root is None else root
    if not root.is_dir():
        return None
    found = []
    for path in sorted(p for p in root.iterdir() if (p / store.MANIFEST_FILE).is_file()):
        try:
            found.append(store.load_adapter(path, base_fingerprint=fingerprint))
        except AdapterFormatError as exc:  # another base model, or damaged: skip it
            log.debug("skipping %s: %s", path, exc)
    found.sort(key=lambda a: a.manifest.method != "matryoshka")
    return found[0] if found else None


def attach_demo_adapter(model, adapter_dir: str | os.PathLike | None, max_rank: int) -> store.AdapterManifest | None:
    """Attach the chosen adapter; returns its manifest, or None for a fresh (zero-B) adapter."""
    from matryoshka_lora.models import model_fingerprint

    fingerprint = model_fingerprint(model)
    adapter = (
        store.load_adapter(adapter_dir, base_fingerprint=fingerprint)
        if adapter_dir
        else find_shipped_adapter(fingerprint)
    )
    if adapter is None:
        r_max = max(FRESH_R_MAX, max_rank)
        log.warning(
            "no adapter for this base model under %s: attaching a fresh one (random A, zero B, r_max=%d), "
            "which equals the base model at every rank",
            shipped_adapters_dir(),
            r_max,
        )
        inject.inject_lora(model, r_max, seed=0)
        return None
    store.attach_adapter(model, adapter)
    log.info(
        "attached adapter %r (%s, r_max=%d) from %s",
        adapter.manifest.name,
        adapter.manifest.method,
        adapter.manifest.r_max,
        adapter.path,
    )
    return adapter.manifest


def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run_demo(
    model_dir, ranks: list[int], prompt: str, adapter_dir=None, max_new_tokens: int = 48
) -> list[tuple[int, str]]:
    """[(rank, generated text)] for each rank the adapter offers (others are dropped with a warning)."""
    from matryoshka_lora.models import load_base_model

    model, tokenizer = load_base_model(model_dir)
    manifest = attach_demo_adapter(model, adapter_dir, max(ranks))
    r_max = manifest.r_max if manifest else max(FRESH_R_MAX, max(ranks))
    dropped = [r for r in ranks if r > r_max]
    if dropped:
        log.warning("the adapter has r_max=%d: ranks %s skipped", r_max, dropped)
    results = []
    for rank in (r for r in ranks if r <= r_max):
        inject.set_inference_ranks(model, rank)
        results.append((rank, generate(model, tokenizer, prompt, max_new_tokens)))
        log.info("rank %d done", rank)
    return results
