"""MatryoshkaResolver: "ADAPTER@RANK" (or "ADAPTER" = its r_max) -> a LoRARequest of that rank's slice.

    resolve_lora(base, "add3@4"):
        adapter dir  = the directory under $MATRYOSHKA_ADAPTERS_DIR whose manifest names "add3"
                       (the folder is rescanned on a miss, so adapters copied in while serving are found)
        refuse       unknown adapter, rank outside 1..r_max, a manifest base_model other than the
                     served model's directory name ($MATRYOSHKA_SKIP_BASE_CHECK=1 skips that check)
        export       the rank-4 slice as a PEFT dir under $MATRYOSHKA_CACHE/vllm-loras/ (once)
        return       LoRARequest("add3@4", stable id, that dir)     (None for a refusal, with a log line)

A rank above the server's --max-lora-rank passes here and fails in vLLM's add_lora (HTTP 400).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from matryoshka_lora.adapters.store import read_manifest
from matryoshka_lora.backends.vllm_loras import LoraIdMap, adapter_digest, export_slice, lora_cache_dir, parse_lora_name
from matryoshka_lora.errors import MatryoshkaError

log = logging.getLogger(__name__)

SKIP_BASE_CHECK_ENV = "MATRYOSHKA_SKIP_BASE_CHECK"


def scan_adapters(root: Path) -> dict[str, Path]:
    """Manifest name -> adapter directory, for `root` itself or each of its subdirectories."""
    from matryoshka_lora.adapters.store import MANIFEST_FILE

    candidates = [root] if (root / MANIFEST_FILE).is_file() else sorted(p for p in root.iterdir() if p.is_dir())
    found = {}
    for path in candidates:
        if not (path / MANIFEST_FILE).is_file():
            continue
        try:
            found[read_manifest(path).name] = path
        except MatryoshkaError as exc:
            log.warning("skipping %s: %s", path, exc)
    return found


class MatryoshkaResolver(LoRAResolver):
    def __init__(self, adapters_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.root = Path(adapters_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else lora_cache_dir()
        self.ids = LoraIdMap()
        self.paths: dict[str, Path] = {}

    def find(self, adapter: str) -> Path | None:
        if adapter not in self.paths:
            self.paths = scan_adapters(self.root)
        return self.paths.get(adapter)

    def locate(self, base_model_name: str, name: str) -> tuple[str, int, Path] | None:
        """(adapter, rank, adapter dir) for a servable `name`, else None with a log line saying why."""
        try:
            adapter, rank = parse_lora_name(name)
        except MatryoshkaError as exc:
            log.info("not a Matryoshka LoRA name: %s", exc)
            return None
        path = self.find(adapter)
        if path is None:
            log.warning(
                "refusing %r: no Matryoshka adapter %r under %s (found: %s)",
                name,
                adapter,
                self.root,
                sorted(self.paths),
            )
            return None
        manifest = read_manifest(path)
        rank = manifest.r_max if rank is None else rank
        if not 1 <= rank <= manifest.r_max:
            log.warning("refusing %r: rank %d outside 1..%d of adapter %r", name, rank, manifest.r_max, adapter)
            return None
        base = Path(base_model_name).name
        if manifest.base_model != base and os.environ.get(SKIP_BASE_CHECK_ENV) != "1":
            log.warning(
                "refusing %r: adapter %r was trained on %r, this server runs %r (set %s=1 to skip this check)",
                name,
                adapter,
                manifest.base_model,
                base,
                SKIP_BASE_CHECK_ENV,
            )
            return None
        return adapter, rank, path

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            found = await asyncio.to_thread(self.locate, base_model_name, lora_name)
            if found is None:
                return None
            adapter, rank, path = found
            out = await asyncio.to_thread(export_slice, path, adapter, rank, self.cache_dir)
        except (MatryoshkaError, OSError) as exc:
            log.warning("cannot serve %r: %s", lora_name, exc)
            return None
        lora_id = self.ids.id_for((adapter, rank, adapter_digest(path)))
        log.info("resolved %r -> %s (id %d)", lora_name, out, lora_id)
        return LoRARequest(
            lora_name=lora_name, lora_int_id=lora_id, lora_path=str(out), base_model_name=base_model_name
        )
