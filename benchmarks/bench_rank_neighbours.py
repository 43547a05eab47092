"""What a rank-1 request pays for rank-64 neighbours in its batch: engine level (no HTTP), real default model.

    .venv/bin/python benchmarks/bench_rank_neighbours.py [--num-seqs 4,16] [--tokens 64] [--adapter-dtype bfloat16]

One heavy random adapter (all seven projections, r_max 64, float32: the load tests' `lt-a`, made in a
temporary directory) and N sequences decoded together after the same 16-token prompt (greedy, EOS
ignored). Request 0 is at rank 1 throughout; its neighbours are all at rank 1, all at rank 64, or on the
base model. Printed: request 0's ms per output token (median of --repeats, prefill excluded) and the
ratio to the all-rank-1 batch. --adapter-dtype bfloat16 holds the adapter in bfloat16 (half the bytes a
step reads of it; EngineConfig.adapter_dtype). The issue's goal: rank 1 beside rank-64 neighbours <= 1.10x. Measure on
a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from bench_decode_step import decode  # this directory is on sys.path when a script here runs

MIXES = {  # the neighbours of request 0 (at rank 1) of adapter `a`: k of them, as (adapter or None, rank)
    "all at rank 1": lambda a, k: [(a, 1)] * k,
    "neighbours on the base model": lambda a, k: [(None, None)] * k,
    "one at rank 64, the rest rank 1": lambda a, k: [(a, 1)] * (k - 1) + [(a, 64)],
    "neighbours at rank 64": lambda a, k: [(a, 64)] * k,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", default="4,16", help="batch sizes, comma-separated")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapter-dtype", default="auto", help="auto (as saved: float32) | bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine
    from matryoshka_lora.loadtest.runner import make_random_adapters

    sizes = [int(n) for n in args.num_seqs.split(",")]
    config = EngineConfig(
        max_num_seqs=max(sizes), max_model_len=512, num_threads=args.threads, adapter_dtype=args.adapter_dtype
    )
    engine = LLMEngine(config)
    with tempfile.TemporaryDirectory() as tmp:
        name = engine.load_adapter(make_random_adapters(None, Path(tmp), 64)[0]).name
    prompt = engine.tokenizer.encode("Reverse this list of letters: q v k q f m a")[:16]
    print(
        f"weight format {engine.weight_format}, adapter dtype {args.adapter_dtype}; request 0 at rank 1 of {name} "
        "(r_max 64, all modules)"
    )
    print(f"{'sequences':>9s}  {'neighbours':30s} {'ms/token':>9s} {'vs all rank 1':>13s}")
    for n in sizes:
        baseline = None
        for label, neighbours in MIXES.items():
            requests = [(name, 1)] + neighbours(name, n - 1)
            decode(engine, prompt, 8, requests)  # warm-up
            per_token = statistics.median(decode(engine, prompt, args.tokens, requests) for _ in range(args.repeats))
            baseline = baseline or per_token
            print(f"{n:9d}  {label:30s} {per_token * 1e3:9.2f} {per_token / baseline:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
