"""Throughput and latency of the native engine per rank, against transformers peers, in one run.

Workload: N requests (fixed chat prompts, or with --prompt-tokens P the load tests' fixed P-token
prompt), M output tokens each, greedy, EOS ignored, all enqueued at once. Rows: our engine at base,
ranks 1, 8, 32, r_max and a mixed-rank / mixed-adapter batch; then, on the same prompts, the peers
of matryoshka_lora/loadtest/peers.py: transformers static-batch
`generate` and continuous batching `generate_batch`, each on the base model and with the first adapter
exported as PEFT at r_max (unmerged), and vLLM offline (base and LoRA) when --vllm-python names a venv
with vLLM. Adapters: random A and non-zero B on every target module at r_max 64 on the default model
(or --targets only, or the adapters in --adapters).

    python benchmarks/bench_ranks.py [--quick] [--threads 2] [--skip-peers] [--vllm-python .venv-vllm/bin/python]

Numbers depend on what else runs on the machine: measure on a quiet one. Engine rows are the best of
--repeats runs; peer rows the mean of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

log = logging.getLogger("bench_ranks")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis simply.",
    "List three prime numbers.",
    "How do I boil an egg?",
    "Translate 'good morning' to Spanish.",
    "What is 17 times 3?",
    "Name a famous painter.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "What does a CPU do?",
    "Suggest a name for a cat.",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Describe a rainbow.",
    "Tell me a fun fact about octopuses.",
]


def encode_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def summary(name: str, num_tokens: int, wall: float, latencies: list[float]) -> dict:
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    return {"name": name, "tok_s": num_tokens / wall, "wall_s": wall, "p50_s": statistics.median(lat), "p95_s": p95}


def bench_engine(engine, name: str, prompts, cases, max_tokens: int) -> dict:
    """cases[i] = (adapter, rank) of request i; all enqueued at once, stepped until idle."""
    from matryoshka_lora.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    finals = []
    started = time.perf_counter()
    for i, (prompt, (adapter, rank)) in enumerate(zip(prompts, cases)):
        engine.add_request(
            GenerationRequest(f"{name}-{i}", tuple(prompt), params, adapter, rank),
            lambda e: finals.append(e) if e.finished else None,
        )
    while engine.scheduler.has_work():
        engine.step()
    wall = time.perf_counter() - started
    row = summary(name, sum(e.num_output_tokens for e in finals), wall, [e.total_s for e in finals])
    log.info("%s: %.1f tok/s", name, row["tok_s"])
    return row


def peer_rows(args, model, adapter_dir: Path, r_max: int, prompts, tmp: Path) -> list[dict]:
    """The peers of the load tests' `peers` scenario, on these prompts, as rows of this table."""
    from matryoshka_lora.adapters.peft_io import export_peft
    from matryoshka_lora.loadtest import peers
    from matryoshka_lora.models import resolve_model_dir

    if args.random_init:  # the peers load the model from a directory: give them these random weights
        model_dir = tmp / "model"
        model.save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(args.model).save_pretrained(model_dir)
    else:
        model_dir = resolve_model_dir(args.model)
    peft_dir = export_peft(adapter_dir, r_max, tmp / "peft")
    results = peers.transformers_peers(str(model_dir), peft_dir, prompts, args.max_tokens, args.threads, args.repeats)
    if args.vllm_python:
        results += peers.vllm_peers(
            Path(args.vllm_python), model_dir, peft_dir, prompts, args.max_tokens, args.threads, tmp / "vllm"
        )
    return [
        {
            "name": r.system,
            "tok_s": r.output_tok_s or float("nan"),
            "wall_s": r.wall_s or float("nan"),
            "p50_s": r.wall_s or float("nan"),
            "p95_s": r.wall_s or float("nan"),
        }
        for r in results
    ]


def make_adapters(model, root: Path, r_max: int, targets: tuple[str, ...] | None = None) -> list[Path]:
    from matryoshka_lora.adapters.random_adapter import (
        DEFAULT_TARGET_MODULES,
        save_random_adapter,
    )

    return [
        save_random_adapter(
            model, root / name, name, r_max, target_modules=targets or DEFAULT_TARGET_MODULES, seed=seed, std=0.02
        )
        for seed, name in enumerate(("bench-a", "bench-b"))
    ]


def engine_rows(engine, label: str, args, prompts) -> list[dict]:
    """base, each rank, mixed ranks + adapters (n requests at once), and one user alone at r_max."""
    names = engine.adapters.names()
    r_max = engine.adapters.get(names[0]).r_max
    bench_engine(engine, "warmup", prompts[:4], [(names[0], r_max)] * 4, 4)

    def best(name, prompts, cases, max_tokens):
        runs = [
            bench_engine(engine, f"{label} {name}", prompts, cases, max_tokens) for _ in range(max(args.repeats, 1))
        ]
        return max(runs, key=lambda r: r["tok_s"])

    n = args.num_requests
    rank_list = [1, r_max] if args.quick else sorted({1, 8, 32, r_max} & set(range(1, r_max + 1)))
    rows = [best("base", prompts, [(None, None)] * n, args.max_tokens)]
    rows += [best(f"rank {rank}", prompts, [(names[0], rank)] * n, args.max_tokens) for rank in rank_list]
    mixed_ranks = [r for r in (1, 8, 32, r_max) if r <= r_max]
    mixed = [(names[i % len(names)], mixed_ranks[i % len(mixed_ranks)]) for i in range(n)]
    rows.append(best("mixed ranks+adapters", prompts, mixed, args.max_tokens))
    rows.append(
        best(
            f"one user, rank {r_max}, {args.single_tokens} tokens", prompts[:1], [(names[0], r_max)], args.single_tokens
        )
    )
    rows.append(best(f"one user, base, {args.single_tokens} tokens", prompts[:1], [(None, None)], args.single_tokens))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 requests x 16 tokens; ranks 1 and r_max only")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--r-max", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine workload; the best is reported")
    parser.add_argument("--adapters", help="a folder of adapters to use instead of random ones")
    parser.add_argument(
        "--targets",
        help="modules of the random adapters, comma-separated (default: all seven "
        "q,k,v,o,gate,up,down projections), e.g. q_proj,v_proj",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        help="every request gets the load tests' fixed prompt of exactly this many tokens "
        "(default: 16 short chat prompts, ~37 tokens)",
    )
    parser.add_argument("--skip-peers", action="store_true", help="only the native engine")
    parser.add_argument(
        "--weight-formats",
        help="engine weight formats to run, comma-separated (gguf+bf16, gguf: the GGUF file's blocks; float32); "
        "default: what `serve` picks on this CPU (weight_format.auto_formats()[0])",
    )
    parser.add_argument("--single-tokens", type=int, default=128, help="output tokens of the one-user row")
    parser.add_argument("--model", help="a local HF model directory instead of the default model")
    parser.add_argument("--vllm-python", help="python of a venv with vLLM (e.g. .venv-vllm/bin/python): adds vLLM rows")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="random weights of --model's architecture (timing only, where the weights are absent)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.quick:
        args.num_requests, args.max_tokens, args.repeats = 8, 16, 1
    torch.set_num_threads(args.threads)

    from matryoshka_lora.adapters.store import adapter_dirs, read_manifest
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine
    from matryoshka_lora.models import load_base_model

    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = load_base_model(args.model)
    if args.prompt_tokens:
        from matryoshka_lora.loadtest.prompts import exact_prompt

        ids = exact_prompt(tokenizer, args.prompt_tokens)[1]
        prompts = [list(ids) for _ in range(args.num_requests)]  # one list per request, as the peers get
    else:
        prompts = encode_prompts(tokenizer, args.num_requests)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    paths = (
        adapter_dirs(args.adapters)
        if args.adapters
        else make_adapters(model, tmp, args.r_max, tuple(args.targets.split(",")) if args.targets else None)
    )
    rows = []
    n = args.num_requests
    from matryoshka_lora.engine.weight_format import auto_formats

    for weight_format in (args.weight_formats or auto_formats()[0]).split(","):
        engine = LLMEngine(
            EngineConfig(
                adapters=[str(p) for p in paths],
                max_num_seqs=max(n, 1),
                max_model_len=min(512, model.config.max_position_embeddings),
                num_threads=args.threads,
                weight_format=weight_format,
            ),
            hf_model=model,
            tokenizer=tokenizer,
        )
        rows += engine_rows(engine, f"engine {weight_format}", args, prompts)
        del engine
    if not args.skip_peers:
        r_max = read_manifest(paths[0]).r_max
        rows += peer_rows(args, model, paths[0], r_max, prompts, tmp)
    print(
        f"\n{n} requests x {args.max_tokens} tokens ({sum(map(len, prompts))} prompt tokens), greedy, "
        f"{args.threads} threads"
    )
    print(f"{'workload':45s} {'tok/s':>8s} {'wall s':>8s} {'p50 s':>8s} {'p95 s':>8s}")
    for r in rows:
        print(f"{r['name']:45s} {r['tok_s']:8.1f} {r['wall_s']:8.2f} {r['p50_s']:8.2f} {r['p95_s']:8.2f}")


if __name__ == "__main__":
    main()
