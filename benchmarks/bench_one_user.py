"""One sequence decoding on the real default model, engine level (no HTTP): ms per token and where it goes.

    .venv/bin/python benchmarks/bench_one_user.py [--adapter adapters/reverse-matryoshka@32] [--tokens 128]

For each one-row kernel (`int8`: x quantised to int8 per block and VNNI dot products, where the CPU has
AVX512-VNNI; `float`: the same library built with -DML_NO_INT8_ROW) the engine decodes one request of
--tokens tokens after a 16-token prompt (greedy, EOS ignored), --repeats times; printed: ms per output
token (median), and from one more run with every linear timed, the linears' (GGUF blocks, lm_head
included) share of a decode step and their GB/s of weight bytes. Compare with benchmarks/bench_stream.py's
read roof. Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def block_linears(engine):
    """Every BlockLinear the engine's decode steps run (the narrow side of a SplitLinear)."""
    from matryoshka_lora.engine.cpu_linear import BlockLinear

    weights = engine.weights
    found = [lin for layer in weights.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    found.append(weights.lm_head)
    found = [getattr(lin, "narrow", lin) for lin in found]
    return [lin for lin in found if isinstance(lin, BlockLinear)]


def decode(engine, prompt: list[int], tokens: int, adapter, rank) -> float:
    """Seconds per output token of one request, the prefill step excluded."""
    from matryoshka_lora.types import GenerationRequest, SamplingParams

    stamps: list[float] = []
    request = GenerationRequest("one", prompt, SamplingParams(max_tokens=tokens, ignore_eos=True), adapter, rank)
    engine.add_request(request, lambda event: stamps.append(time.perf_counter()))
    while engine.scheduler.has_work():
        engine.step()
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="DIR@RANK: decode with this adapter at this rank")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from matryoshka_lora.engine import cpu_kernels
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.cpu_linear import BlockLinear
    from matryoshka_lora.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(max_num_seqs=4, max_model_len=512, num_threads=args.threads))
    adapter, rank = None, None
    if args.adapter:
        path, rank = args.adapter.rsplit("@", 1)
        adapter, rank = engine.load_adapter(path).name, int(rank)
    linears = block_linears(engine)
    libs = {"int8": linears[0].lib, "float": cpu_kernels._load(cpu_kernels.build_library(("-DML_NO_INT8_ROW",)))}
    if not libs["int8"].ml_blocks_int8_row():
        libs.pop("int8")
    num_bytes = sum(lin.num_bytes for lin in linears)
    prompt = engine.tokenizer.encode("Reverse this list of letters: q v k q f m a")[:16]
    prompt += [prompt[-1]] * (16 - len(prompt))
    print(f"weight format {engine.weight_format}, {len(linears)} block linears, {num_bytes / 1e6:.1f} MB a decode step")
    print(f"{'one row':8s} {'ms/token':>9s} {'tok/s':>7s} {'linears ms':>11s} {'share':>6s} {'GB/s':>6s}")
    for name, lib in libs.items():
        for lin in linears:
            lin.lib = lib
        decode(engine, prompt, 8, adapter, rank)  # warm-up
        per_token = statistics.median(decode(engine, prompt, args.tokens, adapter, rank) for _ in range(args.repeats))
        spent = [0.0]
        call = BlockLinear.__call__

        def timed(self, x, call=call):
            started = time.perf_counter()
            y = call(self, x)
            spent[0] += time.perf_counter() - started if x.shape[0] == 1 else 0.0
            return y

        BlockLinear.__call__ = timed
        try:
            timed_total = decode(engine, prompt, args.tokens, adapter, rank)
        finally:
            BlockLinear.__call__ = call
        linear_ms = spent[0] / (args.tokens - 1) * 1e3
        print(
            f"{name:8s} {per_token * 1e3:9.2f} {1 / per_token:7.1f} {linear_ms:11.2f} "
            f"{linear_ms / (timed_total * 1e3):6.0%} {num_bytes / (linear_ms / 1e3) / 1e9:6.1f}"
        )


if __name__ == "__main__":
    main()
