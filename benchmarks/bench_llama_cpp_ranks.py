"""What a LoRA's rank costs, ours against llama.cpp's llama-server: one heavy adapter (random, all seven
projections, r_max 64) served at ranks 1, 8, 32 and 64, one user and N at once, back to back in one run.

    bash scripts/build_llama_cpp.sh                                  # once
    .venv/bin/python benchmarks/bench_llama_cpp_ranks.py --out docs/runs/llama_cpp/ranks.json   # ~8 min

Ours: one `matryoshka-lora serve` with the adapter; a request names ADAPTER@RANK (a slice of the one
loaded copy). llama.cpp cannot slice an adapter: each rank is the adapter exported as PEFT at that rank,
converted by its own convert_lora_to_gguf.py and served by a llama-server of its own (scale 1 for every
request). Base rows: no LoRA (ours: the base model; llama.cpp: scale 0). Streamed /v1/completions,
greedy, EOS ignored, the load tests' fixed prompt (--prompt-tokens), one warm-up burst then --repeats
timed bursts (mean tok/s, output tokens over the burst's wall clock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
from pathlib import Path

log = logging.getLogger("bench_llama_cpp_ranks")

RANKS = (1, 8, 32, 64)


def workloads(args) -> list[tuple[str, int, int]]:
    """(label, requests at once, tokens each)."""
    return [(f"{args.num_requests} at once", args.num_requests, args.max_tokens), ("one user", 1, args.single_tokens)]


def row(system: str, rank: int, label: str, result) -> dict:
    return {"system": system, "rank": rank, "workload": label, "tok_s": result.output_tok_s, "error": result.error}


def ours(args, adapter_dir: Path, name: str, prompt: str, workdir: Path) -> list[dict]:
    from matryoshka_lora.loadtest.openloop import completions_burst
    from matryoshka_lora.loadtest.peers import timed
    from matryoshka_lora.loadtest.server import ServerProcess, serve_args
    from matryoshka_lora.models import DEFAULT_MODEL_ID

    rows = []
    serve = serve_args(None, [adapter_dir], args.threads, max_num_seqs=args.num_requests)
    with ServerProcess([*serve, "--no-access-log"], workdir / "ours.log") as server:
        for rank in (0, *RANKS):
            model = DEFAULT_MODEL_ID if rank == 0 else f"{name}@{rank}"
            for label, n, m in workloads(args):

                def generate(tokens: int, n=n, model=model) -> int:
                    counts = asyncio.run(completions_burst(server.url, model, prompt, tokens, n))
                    return sum(c.completion_tokens for c in counts)

                rows.append(row("ours", rank, label, timed(f"ours rank {rank}, {label}", generate, n, m, args.repeats)))
    return rows


def llama(args, adapter_dir: Path, prompt: str, workdir: Path) -> list[dict]:
    from matryoshka_lora.adapters.peft_io import export_peft
    from matryoshka_lora.loadtest.llama_cpp import LlamaServerProcess, convert_lora, find_llama_cpp
    from matryoshka_lora.loadtest.openloop import completions_burst
    from matryoshka_lora.loadtest.peers import timed
    from matryoshka_lora.models import default_gguf_path, default_model_dir

    build = find_llama_cpp()
    if build is None:
        raise SystemExit("llama.cpp is not built: run bash scripts/build_llama_cpp.sh")
    ctx_per_slot = 4 * len(prompt) // 3 + max(args.max_tokens, args.single_tokens) + 64
    rows = []
    for rank in RANKS:
        peft_dir = export_peft(adapter_dir, rank, workdir / f"peft-r{rank}")
        lora = convert_lora(build, peft_dir, default_model_dir(), workdir / f"lora-r{rank}.gguf")
        log_path = workdir / f"llama-server-r{rank}.log"
        with LlamaServerProcess(
            build, default_gguf_path(), lora, args.num_requests, ctx_per_slot, args.threads, log_path
        ) as server:
            scales = (0.0, 1.0) if rank == RANKS[0] else (1.0,)  # the base rows once, on the first server
            for scale in scales:
                extras = [{"lora": [{"id": 0, "scale": scale}]}]
                for label, n, m in workloads(args):

                    def generate(tokens: int, n=n, extras=extras) -> int:
                        counts = asyncio.run(completions_burst(server.url, "base", prompt, tokens, n, extras=extras))
                        return sum(c.completion_tokens for c in counts)

                    r = rank if scale else 0
                    result = timed(f"llama.cpp rank {r}, {label}", generate, n, m, args.repeats)
                    rows.append(row("llama.cpp", r, label, result))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from transformers import AutoTokenizer

    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.loadtest.prompts import exact_prompt
    from matryoshka_lora.models import default_model_dir, load_base_model

    workdir = Path(tempfile.mkdtemp(prefix="bench-llama-cpp-ranks-"))
    model, tokenizer = load_base_model(None)
    name = "heavy-r64"
    adapter_dir = save_random_adapter(model, workdir / "adapters" / name, name, max(RANKS), seed=0, std=0.02)
    del model
    prompt = exact_prompt(AutoTokenizer.from_pretrained(default_model_dir()), args.prompt_tokens)[0]
    rows = ours(args, adapter_dir.parent, name, prompt, workdir) + llama(args, adapter_dir, prompt, workdir)
    peer = {(r["rank"], r["workload"]): r["tok_s"] for r in rows if r["system"] == "llama.cpp"}
    print(f"\nall-module random adapter, r_max {max(RANKS)}; {args.prompt_tokens}-token prompt; {args.threads} threads")
    print(f"{'rank':>4} {'workload':<14} {'ours tok/s':>10} {'llama.cpp':>10} {'ratio':>7}")
    for r in (x for x in rows if x["system"] == "ours"):
        theirs = peer.get((r["rank"], r["workload"]))
        ratio = r["tok_s"] / theirs if r["tok_s"] and theirs else None
        r["ratio_over_llama_cpp"] = round(ratio, 3) if ratio else None
        fmt = lambda v: f"{v:.1f}" if v else "failed"  # noqa: E731
        print(f"{r['rank']:>4} {r['workload']:<14} {fmt(r['tok_s']):>10} {fmt(theirs):>10} {ratio or 0:>6.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
