"""What a request's context costs: bursts of N requests with P-token prompts on the engine (no HTTP).

    .venv/bin/python benchmarks/bench_context.py [--adapter adapters/reverse-matryoshka@32] [--cases 16x16,16x128,16x512,1x512]
        [--kv-cache-dtypes float32,bfloat16]

For each case NxP, N requests with the same P-token prompt and --tokens output tokens each (greedy, EOS
ignored) are enqueued at once and the engine runs until all finish; printed: the burst's wall clock
(prefill included) and the first request's ms per output token after its first (with N > 1 and long
prompts these steps also carry the other requests' prefill chunks). Median of --repeats after a
warm-up. With several --kv-cache-dtypes, one engine per dtype, their bursts interleaved. Measure on a
quiet machine; compare builds or commits in one sitting.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_decode_step import decode  # this directory is on sys.path when a script here runs


def burst(engine, prompt: list[int], num_requests: int, tokens: int, adapter, rank) -> tuple[float, float]:
    """(seconds for the whole burst, seconds per output token of the first request after its first)."""
    started = time.perf_counter()
    per_token = decode(engine, prompt, tokens, [(adapter, rank)] * num_requests)
    return time.perf_counter() - started, per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="DIR@RANK: serve this adapter at this rank (default: the base model)")
    parser.add_argument("--cases", default="16x16,16x128,16x512,1x512", help="NxP: N requests of P prompt tokens")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-dtypes", default="auto", help="EngineConfig.kv_cache_dtype values, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine

    cases = [tuple(int(v) for v in case.split("x")) for case in args.cases.split(",")]
    engines = {}
    for dtype in args.kv_cache_dtypes.split(","):
        config = EngineConfig(max_num_seqs=max(n for n, _ in cases), num_threads=args.threads, kv_cache_dtype=dtype)
        engines[dtype] = LLMEngine(config)
    adapter, rank = None, None
    if args.adapter:
        path, rank = args.adapter.rsplit("@", 1)
        adapter, rank = [e.load_adapter(path).name for e in engines.values()][0], int(rank)
    engine = next(iter(engines.values()))
    text = "Reverse this list of letters: q v k q f m a b c d e f g h i j k l m n o p. "
    longest = max(p for _, p in cases)
    ids = engine.tokenizer.encode(text)
    ids = (ids * (longest // len(ids) + 1))[:longest]
    print(f"weight format {engine.weight_format}, adapter {args.adapter or 'none'}, {args.tokens} output tokens")
    print(f"{'kv cache':>9s} {'requests x prompt':>18s} {'burst ms':>9s} {'ms/token':>9s}")
    for num_requests, prompt_tokens in cases:
        prompt = ids[:prompt_tokens]
        runs: dict[str, list] = {dtype: [] for dtype in engines}
        for e in engines.values():
            burst(e, prompt, num_requests, 8, adapter, rank)  # warm-up
        for _ in range(args.repeats):
            for dtype, e in engines.items():
                runs[dtype].append(burst(e, prompt, num_requests, args.tokens, adapter, rank))
        for dtype, done in runs.items():
            wall = statistics.median(r[0] for r in done)
            per_token = statistics.median(r[1] for r in done)
            print(f"{dtype:>9s} {f'{num_requests} x {prompt_tokens}':>18s} {wall * 1e3:9.0f} {per_token * 1e3:9.2f}")


if __name__ == "__main__":
    main()
