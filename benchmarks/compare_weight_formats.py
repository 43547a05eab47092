"""Greedy outputs of the real model per weight format: how many continuations match the float32 reference.

    .venv/bin/python benchmarks/compare_weight_formats.py [--formats gguf,gguf+bf16] [--num-prompts 64]

Prompts: the test prompts of the sst2, arithmetic and reverse tasks (chat-templated, as served), in turn;
each continued greedily for --max-tokens tokens (EOS ignored) on the embedded default model, all prompts
in one continuous batch (prefill steps are wide, decode steps of up to --max-num-seqs sequences), once per
format. Printed per format: prompts whose tokens equal float32's, and the mean index of the first
different token among the rest. `--adapter DIR@RANK` continues with an adapter at that rank.
"""

from __future__ import annotations

import argparse
import json


def continuations(weight_format: str, prompts, args, model, tokenizer) -> list[list[int]]:
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine
    from matryoshka_lora.types import GenerationRequest, SamplingParams

    config = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_model_len=512, warmup=False, weight_format=weight_format, num_threads=2
    )
    engine = LLMEngine(config, hf_model=model, tokenizer=tokenizer)
    adapter, rank = None, None
    if args.adapter:
        path, rank = args.adapter.rsplit("@", 1)
        adapter, rank = engine.load_adapter(path).name, int(rank)
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        request = GenerationRequest(f"p{i}", ids, params, adapter, rank)
        engine.add_request(request, lambda event, i=i: out[i].extend(event.token_ids))
    while engine.scheduler.has_work():
        engine.step()
    return [out[i] for i in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default="gguf,gguf+bf16")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--adapter", help="DIR@RANK: continue with this adapter at this rank")
    parser.add_argument("--out", help="write the summary as JSON here")
    args = parser.parse_args()

    from matryoshka_lora.models import load_base_model
    from matryoshka_lora.training import tasks
    from matryoshka_lora.training.engine_eval import prompt_ids

    model, tokenizer = load_base_model(None)
    per_task = args.num_prompts // 3 + 1
    examples = [tasks.task_examples(t, "test", per_task) for t in ("sst2", "arithmetic", "reverse")]
    mixed = [ex for group in zip(*examples) for ex in group][: args.num_prompts]
    prompts = [prompt_ids(tokenizer, ex.prompt) for ex in mixed]
    reference = continuations("float32", prompts, args, model, tokenizer)
    summary = {"num_prompts": len(prompts), "max_tokens": args.max_tokens, "adapter": args.adapter, "formats": {}}
    print(f"{len(prompts)} prompts x {args.max_tokens} greedy tokens, against float32")
    for weight_format in args.formats.split(","):
        got = continuations(weight_format, prompts, args, model, tokenizer)
        firsts = [next(i for i, (a, b) in enumerate(zip(g, r)) if a != b) for g, r in zip(got, reference) if g != r]
        same = len(prompts) - len(firsts)
        mean_first = sum(firsts) / len(firsts) if firsts else None
        summary["formats"][weight_format] = {"identical": same, "mean_first_difference": mean_first}
        where = f", first different token at {mean_first:.1f} on average" if firsts else ""
        print(f"{weight_format:10s} identical {same}/{len(prompts)}{where}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
