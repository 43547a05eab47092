"""What turns (adapter, rank) into something vLLM can load: shared by the vLLM backend and the resolver plugin.

vLLM loads LoRA adapters from PEFT directories, one rank per directory, so each (adapter, rank) in use
is exported once (`adapters.peft_io.export_peft`) into a cache:

    <cache>/vllm-loras/<adapter>@<rank>-<digest>/     adapter_config.json + adapter_model.safetensors

`digest` hashes the source adapter's files (path, sizes, mtimes), so replacing an adapter under the same
name exports afresh instead of reusing a stale slice. Every (adapter, rank, digest) gets a stable integer
id (vLLM's `lora_int_id`) from `LoraIdMap`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import zlib
from pathlib import Path

from matryoshka_lora.adapters.store import MANIFEST_FILE, WEIGHTS_FILE
from matryoshka_lora.errors import ConfigError, check_count

log = logging.getLogger(__name__)

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks (0.11 .. 0.32)
RANK_SEPARATOR = "@"
MAX_LORA_ID = 2**31 - 1


def vllm_max_lora_rank(r_max: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds rank `r_max`: 4 -> 8, 8 -> 8, 12 -> 16."""
    check_count("r_max", r_max)
    for size in VLLM_MAX_LORA_RANKS:
        if size >= r_max:
            return size
    raise ConfigError("r_max for vLLM", r_max, f"at most {VLLM_MAX_LORA_RANKS[-1]} (vLLM's largest max_lora_rank)")


def lora_name(adapter: str, rank: int) -> str:
    """The name vLLM sees: "ADAPTER@RANK"."""
    return f"{adapter}{RANK_SEPARATOR}{rank}"


def parse_lora_name(name: str) -> tuple[str, int | None]:
    """ "add3@8" -> ("add3", 8); "add3" -> ("add3", None). ConfigError for a rank that is not an integer."""
    adapter, sep, rank_text = name.rpartition(RANK_SEPARATOR)
    if not sep:
        return name, None
    if not adapter or not rank_text.isdigit():
        raise ConfigError("LoRA name", name, "ADAPTER or ADAPTER@RANK with an integer RANK, e.g. add3@8")
    return adapter, int(rank_text)


def adapter_digest(path: str | os.PathLike) -> str:
    """A short hash of an adapter directory's identity: resolved path, and size + mtime of its files."""
    root = Path(path).resolve()
    digest = hashlib.sha256(str(root).encode())
    for name in (MANIFEST_FILE, WEIGHTS_FILE):
        stat = (root / name).stat()
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:10]


class LoraIdMap:
    """A stable integer id per key (e.g. (adapter, rank, digest)): the same key always gets the same id,
    two keys never share one. The first choice is a CRC32 of the key (so the same key gets the same id in
    every process); a collision moves to the next free id."""

    def __init__(self) -> None:
        self._ids: dict[tuple, int] = {}
        self._used: set[int] = set()

    def id_for(self, key: tuple) -> int:
        if key in self._ids:
            return self._ids[key]
        candidate = zlib.crc32(repr(key).encode()) % MAX_LORA_ID + 1
        while candidate in self._used:
            candidate = candidate % MAX_LORA_ID + 1
        self._ids[key] = candidate
        self._used.add(candidate)
        return candidate

    def forget(self, adapter: str) -> list[int]:
        """Drop every key whose first item is `adapter`; return their ids (to remove from vLLM)."""
        gone = [key for key in self._ids if key[0] == adapter]
        ids = [self._ids.pop(key) for key in gone]
        self._used.difference_update(ids)
        return ids

    def __len__(self) -> int:
        return len(self._ids)


def lora_cache_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """<cache_root>/vllm-loras; cache_root defaults to models.cache_root() ($MATRYOSHKA_CACHE)."""
    from matryoshka_lora.models import cache_root as default_root

    return Path(cache_root if cache_root is not None else default_root()) / "vllm-loras"


def export_slice(adapter_path: str | os.PathLike, name: str, rank: int, cache_dir: Path) -> Path:
    """The PEFT directory of `name`'s rank-`rank` slice, exported on first use.

    The export goes to a temporary directory renamed into place, so concurrent processes (several vLLM
    API servers with the resolver) never see a half-written slice. InvalidRankError from export_peft
    for a rank outside 1..r_max.
    """
    from matryoshka_lora.adapters.peft_io import PEFT_CONFIG_FILE, export_peft

    out = cache_dir / f"{lora_name(name, rank)}-{adapter_digest(adapter_path)}"
    if (out / PEFT_CONFIG_FILE).is_file():
        return out
    tmp = cache_dir / f".{out.name}.tmp{os.getpid()}-{threading.get_ident()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    export_peft(adapter_path, rank, tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return out
