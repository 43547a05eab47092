"""llama.cpp's `llama-server` as a CPU peer over HTTP: the same GGUF file, prompt, client and bursts as ours.

    find_llama_cpp()        the build of scripts/build_llama_cpp.sh (or $MATRYOSHKA_LLAMA_CPP): llama-server
                            and the tree's convert_lora_to_gguf.py; None when it is not built
    convert_lora(...)       a PEFT adapter directory -> a LoRA GGUF, with llama.cpp's own converter
    LlamaServerProcess      `llama-server -m BASE.gguf --lora LORA.gguf -np N ...`, ready on GET /health
    llama_cpp_peers(...)    the workloads below, each timed as the other peers (`peers.timed`: a warm-up
                            burst, then `repeats` timed bursts; tok/s = N x M / wall)

Workloads, all on one server started with the adapter loaded (`--lora-init-without-apply`, so a request
chooses its scale with llama-server's per-request `lora` field):
    base          N requests at once, LoRA scale 0
    LoRA          N at once, scale 1
    mixed         N at once, scales 1 / 0 / 0.5 in turn (llama.cpp batches only requests of one LoRA
                  configuration together, so a mixed batch runs as several smaller ones)
    one user      1 request, scale 1, and 1 request, scale 0
llama.cpp cannot serve a sub-rank of an adapter: a rank-r slice is its own exported file and server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from matryoshka_lora.loadtest.openloop import completions_burst
from matryoshka_lora.loadtest.peers import PeerResult, timed
from matryoshka_lora.loadtest.server import ServerProcess

log = logging.getLogger(__name__)

VERSION = "0.3.36"  # llama-cpp-python's sdist whose vendored llama.cpp scripts/build_llama_cpp.sh builds
MIXED_SCALES = (1.0, 0.0, 0.5)


@dataclass(frozen=True)
class LlamaCpp:
    server: Path  # the llama-server binary
    source: Path  # the llama.cpp tree (convert_lora_to_gguf.py)


def find_llama_cpp() -> LlamaCpp | None:
    """$MATRYOSHKA_LLAMA_CPP or the cache's build (models.cache_root()/llama.cpp/VERSION), if it is built."""
    from matryoshka_lora.models import cache_root

    root = Path(os.environ.get("MATRYOSHKA_LLAMA_CPP") or cache_root() / "llama.cpp" / VERSION)
    server, source = root / "build" / "bin" / "llama-server", root / "src"
    if server.is_file() and os.access(server, os.X_OK) and (source / "convert_lora_to_gguf.py").is_file():
        return LlamaCpp(server, source)
    return None


def convert_lora(llama: LlamaCpp, peft_dir: Path, base_dir: Path, out: Path, timeout_s: float = 600.0) -> Path:
    """llama.cpp's convert_lora_to_gguf.py: PEFT adapter (on base_dir's HF config) -> a float32 LoRA GGUF."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(llama.source / "convert_lora_to_gguf.py"),
        "--base",
        str(base_dir),
        "--outtype",
        "f32",
        "--outfile",
        str(out),
        str(peft_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_lora_to_gguf.py failed ({result.returncode}): {result.stderr[-1500:]}")
    return out


class LlamaServerProcess(ServerProcess):
    """llama-server on the GGUF model, `num_slots` parallel sequences (continuous batching), one LoRA loaded."""

    ready_path = "/health"

    def __init__(
        self,
        llama: LlamaCpp,
        model: Path,
        lora: Path | None,
        num_slots: int,
        ctx_per_slot: int,
        num_threads: int,
        log_path: Path,
        ready_timeout_s: float = 300.0,
    ):
        super().__init__([], log_path, ready_timeout_s=ready_timeout_s)
        self.llama, self.model, self.lora = llama, Path(model), lora
        self.num_slots, self.ctx_per_slot, self.num_threads = num_slots, ctx_per_slot, num_threads

    def command(self) -> list[str]:
        cmd = [
            str(self.llama.server),
            "-m",
            str(self.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-np",
            str(self.num_slots),
            "-c",
            str(self.num_slots * self.ctx_per_slot),
            "-t",
            str(self.num_threads),
            "-tb",
            str(self.num_threads),
            "--no-warmup",
            "--seed",
            "0",
        ]
        if self.lora is not None:
            cmd += ["--lora", str(self.lora), "--lora-init-without-apply"]
        return cmd


def llama_cpp_peers(
    llama: LlamaCpp,
    model: Path,
    lora: Path,
    prompt: str,
    num_requests: int,
    max_tokens: int,
    single_tokens: int,
    num_threads: int,
    workdir: Path,
    repeats: int = 2,
) -> list[PeerResult]:
    """The workloads of the module docstring; a PeerResult with `error` for each one that fails."""
    ctx_per_slot = 4 * len(prompt) // 3 + max(max_tokens, single_tokens) + 64  # >= the prompt's tokens + output
    workloads = [  # (system, requests, tokens, per-request lora scales)
        (f"llama.cpp (base), {num_requests} at once", num_requests, max_tokens, [0.0]),
        (f"llama.cpp (LoRA), {num_requests} at once", num_requests, max_tokens, [1.0]),
        (
            f"llama.cpp (mixed LoRA scales 1/0/0.5), {num_requests} at once",
            num_requests,
            max_tokens,
            list(MIXED_SCALES),
        ),
        (f"llama.cpp (LoRA), one user, {single_tokens} tokens", 1, single_tokens, [1.0]),
        (f"llama.cpp (base), one user, {single_tokens} tokens", 1, single_tokens, [0.0]),
    ]
    try:
        server = LlamaServerProcess(
            llama, model, lora, num_requests, ctx_per_slot, num_threads, Path(workdir) / "llama-server.log"
        ).start()
    except Exception as exc:
        log.warning("llama-server did not start: %s", exc)
        return [PeerResult(system, None, n, m, error=f"{type(exc).__name__}: {exc}") for system, n, m, _ in workloads]
    results = []
    try:
        for system, n, m, scales in workloads:
            extras = [{"lora": [{"id": 0, "scale": s}]} for s in scales]

            def generate(tokens: int, n=n, extras=extras) -> int:
                counts = asyncio.run(completions_burst(server.url, "base", prompt, tokens, n, extras=extras))
                return sum(c.completion_tokens for c in counts)

            results.append(timed(system, generate, n, m, repeats))
    finally:
        server.stop()
    return results
