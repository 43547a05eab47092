"""Time one training step (forward + backward + AdamW) of `matryoshka` vs `lora` (and `dylora`) at the same r_max.

The methods differ only in the fixed diagonal p, so a Matryoshka step is ONE forward pass, like plain
LoRA: the step times should agree within noise (the target: within 5%). One model is used for all
methods (only p is swapped) and the methods are interleaved step by step, so a load change on a
shared machine hits them alike. Reports the median and p90 step time of each method and the ratio.

    .venv/bin/python benchmarks/bench_train_step.py [--rank 32] [--batch-size 16] [--steps 12] [--task reverse]
        [--model DIR [--random-init]]    # --random-init: the DIR's architecture with random weights
                                         # (same step time; for machines without the weights)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from matryoshka_lora.adapters import build_p, default_train_ranks, inject
from matryoshka_lora.models import load_base_model
from matryoshka_lora.training import data, tasks

log = logging.getLogger("bench_train_step")


def make_batch(tokenizer, task: str, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    records = data.records_from_examples(tasks.task_examples(task, "train", batch_size))
    batch = data.collate_records(tokenizer, records, max_seq_len=256)
    return {k: v.to(device) for k, v in batch.items()}


def step(model, optimizer, batch) -> float:
    """One optimizer step (bf16 autocast forward on CUDA, as the Trainer does); returns its wall time in seconds."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method (after 2 warm-up steps each)")
    parser.add_argument("--task", default="reverse")
    parser.add_argument("--methods", default="lora,matryoshka,dylora")
    parser.add_argument("--model", help="local HF model dir; default: the embedded default model")
    parser.add_argument("--random-init", action="store_true", help="build the --model dir's config with random weights")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), dtype=torch.float32)
    else:
        model, tokenizer = load_base_model(args.model)
    model.to(device).train()
    model.config.use_cache = False
    inject.inject_lora(model, args.rank, "none", seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(tokenizer, args.task, args.batch_size, device)
    ranks = default_train_ranks(args.rank)
    methods = args.methods.split(",")
    p_of = {m: build_p(m, args.rank, ranks, "none", sampled_rank=ranks[-1] if m == "dylora" else None) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(args.steps + 2):
        for method in methods if i % 2 == 0 else methods[::-1]:  # alternate the order too
            inject.set_p(model, p_of[method].to(device))
            elapsed = step(model, optimizer, batch)
            if i >= 2:
                times[method].append(elapsed)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "rank": args.rank,
        "batch_size": args.batch_size,
        "seq_len": int(batch["input_ids"].shape[1]),
        "steps": args.steps,
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        "p90_s": {m: sorted(t)[int(0.9 * (len(t) - 1))] for m, t in times.items()},
    }
    if "lora" in times and "matryoshka" in times:
        result["matryoshka_over_lora"] = result["median_s"]["matryoshka"] / result["median_s"]["lora"]
    for m in methods:
        log.info(
            "%-10s median %.3f s  p90 %.3f s  (%d steps)", m, result["median_s"][m], result["p90_s"][m], len(times[m])
        )
    if "matryoshka_over_lora" in result:
        log.info("matryoshka / lora step time: %.3f", result["matryoshka_over_lora"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
