"""The per-request-rank LoRA op on a CUDA GPU: does a lower rank cost less there?

    python benchmarks/bench_lora_gpu.py [--dtype bf16] [--shapes smollm2-135m,llama-3-8b]

One transformer layer's LoRA work (the 4 fused groups qkv, o, gate_up, down: all 7 projections, r_max 64)
through the engine's torch op (`lora_ops.lora_grouped_`), the rows of a decode batch (16, 64) or of one
prefill chunk (512):

  * every row at rank 1, 8, 32, 64. A kernel that pads every adapter to its largest rank (vLLM's punica
    kernels pad to `max_lora_rank`) spends the rank-64 time at any rank;
  * the mixed decode batch (the rows split evenly over ranks 1/8/32/64), as one group per rank and as one
    masked group (the CPU engine's choice for few rows);
  * beside them, the layer's base linears (random weights of the same shapes) at the same rows, so that
    the LoRA share of a layer is visible.

Each case runs captured in a CUDA graph (no launch overhead: what the GPU itself spends) and eagerly (what
a Python loop of launches spends); both are the median of 5 timings of 50 back-to-back calls, CUDA events.
Weights are random (the timing does not depend on their values).
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
import torch.nn.functional as F

from matryoshka_lora.engine.adapter_slots import GROUP_MEMBERS, GROUPS, member_columns, random_fused_adapter
from matryoshka_lora.engine.lora_batch import build_groups, build_segments
from matryoshka_lora.engine.lora_ops import LoRAGroup, lora_grouped_
from matryoshka_lora.engine.weights import ModelSpec

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, head_dim=128),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
R_MAX, RANKS, MIXED_RANKS = 64, (1, 8, 32, 64), (1, 8, 32, 64)


def time_us(fn, graph: bool, calls: int = 50, repeats: int = 5) -> float:
    """Median µs per call of fn (in a CUDA graph when `graph`), over `repeats` timings of `calls` calls."""
    fn()  # warm-up: kernels chosen, masks cached on the device
    torch.cuda.synchronize()
    call = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        call = captured.replay
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


class Layer:
    """One layer's inputs, outputs, base weights and fused r_max adapter, on the device."""

    def __init__(self, spec: ModelSpec, rows: int, dtype: torch.dtype):
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.lora = random_fused_adapter(spec, R_MAX, lambda w: w.to("cuda", dtype))[0]
        self.x, self.y, self.base = {}, {}, {}
        for group in GROUPS:
            in_f = spec.module_shape(GROUP_MEMBERS[group][0])[0]
            out_f = max(c1 for _, c1 in member_columns(spec, group).values())
            self.x[group] = torch.randn(rows, in_f, device="cuda", dtype=dtype, generator=gen) * 1e-2
            self.y[group] = torch.zeros(rows, out_f, device="cuda", dtype=dtype)
            self.base[group] = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen) * in_f**-0.5

    def lora_step(self, groups: list[LoRAGroup]) -> None:
        for group in GROUPS:
            lora_grouped_(self.y[group], self.x[group], groups, [self.lora[group]])

    def base_step(self) -> None:
        for group in GROUPS:
            F.linear(self.x[group], self.base[group])


def mixed_groups(rows: int, masked: bool) -> list[LoRAGroup]:
    """The rows split evenly over MIXED_RANKS, one adapter: per-rank groups, or one masked group."""
    per_rank = rows // len(MIXED_RANKS)
    segments = build_segments([(i * per_rank, (i + 1) * per_rank, 0, r, 1.0) for i, r in enumerate(MIXED_RANKS)])
    return build_groups(segments, max_masked_rows=rows if masked else 0)


def bench_shape(name: str, rows_list: list[int], dtype: torch.dtype) -> None:
    spec = ModelSpec(num_layers=1, vocab_size=1, rms_norm_eps=1e-5, max_position_embeddings=4096, **SHAPES[name])
    print(f"\n## {name}: one layer, all 7 projections, r_max {R_MAX}, {str(dtype).removeprefix('torch.')}")
    print("| rows | LoRA case | LoRA µs (graph) | LoRA µs (eager) | base linears µs (graph) | LoRA / base (graph) |")
    print("|---:|---|---:|---:|---:|---:|")
    for rows in rows_list:
        layer = Layer(spec, rows, dtype)
        base_us = time_us(layer.base_step, graph=True)
        cases = [(f"all rows at rank {r}", [LoRAGroup(0, rows, 0, r, 1.0)]) for r in RANKS]
        if rows <= 64:
            cases += [
                ("mixed 1/8/32/64, a group per rank", mixed_groups(rows, masked=False)),
                ("mixed 1/8/32/64, one masked group", mixed_groups(rows, masked=True)),
            ]
        for label, groups in cases:
            graph_us = time_us(partial(layer.lora_step, groups), graph=True)
            eager_us = time_us(partial(layer.lora_step, groups), graph=False)
            print(f"| {rows} | {label} | {graph_us:.1f} | {eager_us:.1f} | {base_us:.1f} | {graph_us / base_us:.2f} |")
        del layer
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--rows", default="16,64,512", help="row counts (decode batches, prefill chunk)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.shapes.split(","):
        if name not in SHAPES:
            parser.error(f"--shapes: {name!r} is not one of {', '.join(SHAPES)}")
        bench_shape(name, [int(r) for r in args.rows.split(",")], DTYPES[args.dtype])


if __name__ == "__main__":
    main()
