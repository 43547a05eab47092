"""Our server against llama.cpp's llama-server on this CPU: the same GGUF model, adapter, prompt, HTTP client
and bursts, measured back to back in one run; ratios ours / llama.cpp.

    bash scripts/build_llama_cpp.sh                        # once (~15-25 min on 2 cores)
    .venv/bin/python benchmarks/bench_llama_cpp.py         # ~5 min
    .venv/bin/python benchmarks/bench_llama_cpp.py --adapter adapters/arithmetic-matryoshka --out runs/llama-cpp-heavy.json

Workloads (streamed POST /v1/completions, greedy, EOS ignored, the load tests' fixed prompt, 128 tokens
unless --prompt-tokens):
    N at once x M tokens      base | the adapter at r_max | mixed: ours ranks 1/8/r_max in turn, llama.cpp
                              LoRA scales 1/0/0.5 in turn (it cannot serve a sub-rank)
    one user x S tokens       with the adapter at r_max | base
Ours runs `matryoshka-lora serve` once per --weight-formats entry (gguf: the file's own blocks; float32);
llama.cpp gets the adapter exported as PEFT at r_max and converted by its own convert_lora_to_gguf.py.
Each row: one warm-up burst, then --repeats timed bursts (mean tok/s). --rounds N runs the whole
sequence (ours, then llama.cpp) N times, so that the VM's drift over minutes shows: each ratio is then
the median over rounds of that round's ours / llama.cpp, with its range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
from pathlib import Path

log = logging.getLogger("bench_llama_cpp")


def ours_rows(args, adapter, prompt: str, workdir: Path) -> list[dict]:
    from matryoshka_lora.loadtest.openloop import completions_burst
    from matryoshka_lora.loadtest.peers import timed
    from matryoshka_lora.loadtest.server import ServerProcess, serve_args
    from matryoshka_lora.models import DEFAULT_MODEL_ID

    name, r_max = adapter.manifest.name, adapter.manifest.r_max
    mixed = [{"model": f"{name}@{r}"} for r in sorted({1, 8, r_max})]
    workloads = [
        ("base", args.num_requests, args.max_tokens, [{"model": DEFAULT_MODEL_ID}]),
        (f"rank {r_max}", args.num_requests, args.max_tokens, [{"model": f"{name}@{r_max}"}]),
        ("mixed ranks " + "/".join(m["model"].split("@")[1] for m in mixed), args.num_requests, args.max_tokens, mixed),
        (f"one user, rank {r_max}", 1, args.single_tokens, [{"model": f"{name}@{r_max}"}]),
        ("one user, base", 1, args.single_tokens, [{"model": DEFAULT_MODEL_ID}]),
    ]
    rows = []
    for weight_format in args.weight_formats.split(","):
        serve = serve_args(None, [Path(args.adapter)], args.threads, max_num_seqs=args.num_requests)
        with ServerProcess(
            [*serve, "--weight-format", weight_format, "--no-access-log"], workdir / f"ours-{weight_format}.log"
        ) as server:
            for label, n, m, extras in workloads:

                def generate(tokens: int, n=n, extras=extras) -> int:
                    counts = asyncio.run(
                        completions_burst(server.url, DEFAULT_MODEL_ID, prompt, tokens, n, extras=extras)
                    )
                    return sum(c.completion_tokens for c in counts)

                result = timed(f"ours ({weight_format}) {label}", generate, n, m, args.repeats)
                rows.append(
                    {"system": result.system, "workload": label, "tok_s": result.output_tok_s, "error": result.error}
                )
    return rows


def llama_rows(args, adapter, prompt: str, workdir: Path) -> list[dict]:
    from matryoshka_lora.adapters.peft_io import export_peft
    from matryoshka_lora.loadtest.llama_cpp import convert_lora, find_llama_cpp, llama_cpp_peers
    from matryoshka_lora.models import default_gguf_path, default_model_dir

    llama = find_llama_cpp()
    if llama is None:
        raise SystemExit("llama.cpp is not built: run bash scripts/build_llama_cpp.sh")
    r_max = adapter.manifest.r_max
    peft_dir = export_peft(Path(args.adapter), r_max, workdir / "peft")
    lora = convert_lora(llama, peft_dir, default_model_dir(), workdir / "lora.gguf")
    results = llama_cpp_peers(
        llama,
        default_gguf_path(),
        lora,
        prompt,
        args.num_requests,
        args.max_tokens,
        args.single_tokens,
        args.threads,
        workdir,
        args.repeats,
    )
    labels = ["base", f"rank {r_max}", "mixed", f"one user, rank {r_max}", "one user, base"]
    return [
        {"system": r.system, "workload": label, "tok_s": r.output_tok_s, "error": r.error}
        for r, label in zip(results, labels)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="adapters/reverse-matryoshka")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-tokens", type=int, default=128)
    parser.add_argument(
        "--prompt-tokens", type=int, default=128, help="tokens of the fixed prompt (loadtest/prompts.py)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="run ours then llama.cpp this many times")
    parser.add_argument("--weight-formats", default="gguf,float32")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from transformers import AutoTokenizer

    from matryoshka_lora.adapters.store import load_adapter
    from matryoshka_lora.loadtest.prompts import exact_prompt
    from matryoshka_lora.models import default_model_dir

    adapter = load_adapter(args.adapter)
    prompt = exact_prompt(AutoTokenizer.from_pretrained(default_model_dir()), args.prompt_tokens)[0]
    workdir = Path(tempfile.mkdtemp(prefix="bench-llama-cpp-"))
    rounds = []
    for i in range(args.rounds):
        ours = ours_rows(args, adapter, prompt, workdir)
        theirs = llama_rows(args, adapter, prompt, workdir)
        llama_by_workload = {r["workload"]: r for r in theirs}
        for row in ours + theirs:
            peer = llama_by_workload.get("mixed" if row["workload"].startswith("mixed") else row["workload"])
            ratio = row["tok_s"] / peer["tok_s"] if row["tok_s"] and peer and peer["tok_s"] and row in ours else None
            row["ratio_over_llama_cpp"] = round(ratio, 3) if ratio else None
            row["round"] = i
        rounds.append(ours + theirs)
    print(
        f"\n{args.num_requests} at once x {args.max_tokens} tokens; one user x {args.single_tokens} tokens; "
        f"adapter {adapter.manifest.name} (r_max {adapter.manifest.r_max}, {','.join(adapter.manifest.target_modules)}); "
        f"{args.threads} threads; {args.rounds} round(s): tok/s per round, median ratio (range)"
    )
    print(f"{'system':60s} {'tok/s':>20s} {'ours/llama.cpp':>22s}")
    for rows in zip(*rounds):
        tok_s = " / ".join(f"{r['tok_s']:.1f}" if r["tok_s"] else f"failed: {r['error']}" for r in rows)
        ratios = sorted(r["ratio_over_llama_cpp"] for r in rows if r["ratio_over_llama_cpp"])
        shown = ""
        if ratios:
            shown = f"{statistics.median(ratios):.2f}x" + (
                f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
            )
        print(f"{rows[0]['system']:60s} {tok_s:>20s} {shown:>22s}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows = [row for r in rounds for row in r]
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
