"""Decode steps on the real default model, engine level (no HTTP), per build of the C kernels: ms per step.

    .venv/bin/python benchmarks/bench_decode_step.py [--adapter adapters/reverse-matryoshka@32] [--num-seqs 1]

For each build of the C kernels (`default`; `no-amx`: -DML_NO_AMX, the int8 rows on VNNI instead of AMX tiles;
`float-row`: -DML_NO_INT8_ROW, one row on float activations
instead of int8 and VNNI; `avx2-gemm`: -DML_NO_AVX512_GEMM, the float32 panels and LoRA groups on the
AVX2 micro-kernel; `before`: both) the engine decodes --num-seqs requests of --tokens tokens after a
16-token prompt each (greedy, EOS ignored), --repeats times, every linear, LoRA group and op on that
build. Printed: ms per decode step (median; prefill excluded), and from one more run with each part
timed, ms per step in the GGUF-block linears (lm_head included; with their GB/s of weight bytes for
one sequence), the bf16 linears (the wide steps of gguf+bf16), the LoRA groups, decode attention, RoPE + cache write, RMSNorm, SiLU-mul, and the rest
(the Python between the kernels, sampling, the scheduler). Compare with benchmarks/bench_stream.py's
read roof. --paths: `one-call` (the default engine: a decode-only step's layers in one C call,
cpu_decode.DecodeLayers; its part "one_call" is that whole forward, LM head included, the parts
inside it not counted apart) and/or `per-call` (llama.forward, one Python call per op). Measure on a
quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import statistics
import time

import torch


def narrow_linears(engine) -> list:
    """The 121 base linears a decode step runs (4 per layer and the lm_head), each SplitLinear's narrow side."""
    weights = engine.weights
    found = [lin for layer in weights.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    return [getattr(lin, "narrow", lin) for lin in [*found, weights.lm_head]]


def block_linears(engine):
    """Every BlockLinear the engine's decode steps run."""
    from matryoshka_lora.engine.cpu_linear import BlockLinear

    return [lin for lin in narrow_linears(engine) if isinstance(lin, BlockLinear)]


BUILDS = {
    "default": (),
    "no-amx": ("-DML_NO_AMX",),
    "float-row": ("-DML_NO_INT8_ROW",),
    "avx2-gemm": ("-DML_NO_AVX512_GEMM",),
}
BUILDS["before"] = BUILDS["float-row"] + BUILDS["avx2-gemm"]


def decode(engine, prompt: list[int], tokens: int, requests: list, on_first_token=None) -> float:
    """Seconds per output token of requests[0] ((adapter or None, rank or None) each, all started together:
    with all in every step, seconds per decode step), its first token (the prefill) excluded; on_first_token,
    if given, is called when that first token is out: the prefill's end."""
    from matryoshka_lora.types import GenerationRequest, SamplingParams

    stamps: list[float] = []
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)

    def first(event) -> None:
        if not stamps and on_first_token is not None:
            on_first_token()
        stamps.append(time.perf_counter())

    for i, (adapter, rank) in enumerate(requests):
        callback = first if i == 0 else (lambda event: None)
        engine.add_request(GenerationRequest(f"r{i}", prompt, params, adapter, rank), callback)
    while engine.scheduler.has_work():
        engine.step()
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def use_build(engine, lib) -> None:
    """Point every C linear, LoRA group and op of the engine at `lib`."""
    from matryoshka_lora.engine.cpu_linear import BlockLinear, PanelLinear

    engine.runner.ops.lib = lib
    for lin in narrow_linears(engine):
        if isinstance(lin, (BlockLinear, PanelLinear)):
            lin.lib = lib


@contextlib.contextmanager
def timed_parts(engine):
    """Seconds spent in the GGUF-block linears ("blocks"), the bf16 ones ("bf16": wide steps on gguf+bf16)
    and each C op of the engine's ops, while open.
    The timers' own cost (~0.5 us a call, ~400 calls a one-row step) lands in the parts."""
    from matryoshka_lora.engine.bf16_linear import Bf16Linear
    from matryoshka_lora.engine.cpu_decode import DecodeLayers
    from matryoshka_lora.engine.cpu_linear import BlockLinear

    spent: collections.Counter = collections.Counter()
    ops = engine.runner.ops
    patched = [
        (DecodeLayers, "forward", "one_call"),
        (BlockLinear, "__call__", "blocks"),
        (Bf16Linear, "__call__", "bf16"),
    ]
    patched += [
        (type(ops), name, name)
        for name in ("lora_grouped_", "decode_attention", "rope_and_cache", "rms_norm", "silu_mul")
    ]
    originals = [(cls, name, getattr(cls, name)) for cls, name, _ in patched]
    depth = [0]  # a part called inside another (the LM head inside one_call) counts for the outer one

    def timer(fn, label):
        def timed(*args, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[label] += time.perf_counter() - started

        return timed

    for (cls, name, label), (_, _, fn) in zip(patched, originals):
        setattr(cls, name, timer(fn, label))
    try:
        yield spent
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", help="DIR@RANK: decode with this adapter at this rank")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--num-seqs", type=int, default=1)
    parser.add_argument("--builds", default="default,float-row,avx2-gemm,before")
    parser.add_argument("--paths", default="one-call,per-call", help="one-call and/or per-call (see above)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from matryoshka_lora.engine import cpu_kernels
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(max_num_seqs=max(4, args.num_seqs), max_model_len=512, num_threads=args.threads))
    adapter, rank = None, None
    if args.adapter:
        path, rank = args.adapter.rsplit("@", 1)
        adapter, rank = engine.load_adapter(path).name, int(rank)
    requests = [(adapter, rank)] * args.num_seqs
    linears = block_linears(engine)
    libs = {name: cpu_kernels._load(cpu_kernels.build_library(BUILDS[name])) for name in args.builds.split(",")}
    num_bytes = sum(lin.num_bytes for lin in linears)
    prompt = engine.tokenizer.encode("Reverse this list of letters: q v k q f m a")[:16]
    prompt += [prompt[-1]] * (16 - len(prompt))
    print(
        f"weight format {engine.weight_format}, {args.num_seqs} sequences, adapter {args.adapter or 'none'}; "
        f"{len(linears)} block linears, {num_bytes / 1e6:.1f} MB"
    )
    parts = ("one_call", "blocks", "bf16", "lora_grouped_", "decode_attention", "rope_and_cache", "rms_norm")
    parts += ("silu_mul",)
    print(
        f"{'build':10s} {'path':8s} {'ms/step':>8s} {'tok/s':>7s} {'GB/s':>6s}  ms per step in: "
        + " ".join(parts)
        + " rest"
    )
    decode_layers = engine.runner.decode_layers
    for (name, lib), path in itertools.product(libs.items(), args.paths.split(",")):
        use_build(engine, lib)
        engine.runner.decode_layers = decode_layers if path == "one-call" else None
        decode(engine, prompt, 8, requests)  # warm-up
        per_step = statistics.median(decode(engine, prompt, args.tokens, requests) for _ in range(args.repeats))
        with timed_parts(engine) as spent:
            timed_step = decode(engine, prompt, args.tokens, requests, spent.clear)
        steps = args.tokens - 1
        ms = {part: spent[part] / steps * 1e3 for part in parts}
        rest = timed_step * 1e3 - sum(ms.values())
        one_row = args.num_seqs == 1 and path == "per-call"
        gbs = f"{num_bytes / (ms['blocks'] / 1e3) / 1e9:6.1f}" if one_row else f"{'':6s}"
        print(
            f"{name:10s} {path:8s} {per_step * 1e3:8.2f} {args.num_seqs / per_step:7.1f} {gbs}  "
            + " ".join(f"{ms[part]:{len(part)}.2f}" for part in parts)
            + f" {rest:4.2f}"
        )


if __name__ == "__main__":
    main()
