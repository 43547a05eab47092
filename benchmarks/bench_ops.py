"""The engine's hot ops, one at a time, on SmolLM2-135M shapes: what the decode step is made of.

    python benchmarks/bench_ops.py [--threads 2] [--step]

1. linear, cache-cold: MKL `x @ W` on a row-major weight vs `PackedLinear` (oneDNN, weight packed once)
   vs `PanelLinear` (the C kernels' panels, cpu_gemm.c), per row count.
2. LoRA expand layout, cache-cold (a 64 MB buffer is written between calls, as the base model's 540 MB
   of weights evict the adapter during a real step): block-structured B with zero blocks (one matmul)
   vs one B per member (k matmuls), rank 8 and 64, 16 rows.
3. the C kernels (engine/cpu_kernels.c, cpu_gemm.c) on 1 and on --threads OpenMP threads vs the torch
   ops they replace, per call: RMSNorm at 16 rows, decode attention of 16 sequences at context ~100
   over 30 layers' caches, the grouped LoRA op (the qkv, gate_up and down groups of one layer, all-module
   r_max 64, cache-cold) for uniform and mixed-rank decode groups and for prefill chunks of 32-512 rows
   (the C columns: every group in C; the engine sends groups of one rank from 256 rows to MKL, the torch
   column: cpu_kernels.MIN_MKL_LORA_ROWS).
4. `--step`: whole decode steps of 16 sequences on the real default model (ModelRunner.execute on fixed
   items, median of 10 after 2), with random all-module adapters at r_max 64: base, rank 1, rank 64,
   and the mixed batch (2 adapters x ranks 1/8/32/64) with masked groups vs one group per rank, each
   with torch ops (oneDNN-packed linears), the C kernels with oneDNN linears, and the C kernels with
   their own linears (cpu_gemm.c) on 1 and on --threads threads.
Prints µs (ms for steps) per call. Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from matryoshka_lora.engine.linear import PackedLinear

HIDDEN, INTERMEDIATE, VOCAB = 576, 1536, 49152
LINEARS = {
    "qkv": (HIDDEN, 960),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (HIDDEN, 2 * INTERMEDIATE),
    "down": (INTERMEDIATE, HIDDEN),
    "lm_head": (HIDDEN, VOCAB),
}
LORA_GROUPS = {"qkv": (HIDDEN, (576, 192, 192)), "gate_up": (HIDDEN, (1536, 1536)), "down": (INTERMEDIATE, (576,))}
_flush = torch.zeros(16 * 1024 * 1024)


def per_call_us(fn, *args, n: int = 100, cold: bool = False) -> float:
    """Median µs of `fn(*args)` over n calls after 5 warm-ups; cold: evict the caches before each call."""
    times = []
    for i in range(n + 5):
        if cold:
            _flush.add_(1.0)
        started = time.perf_counter()
        fn(*args)
        if i >= 5:
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


@torch.inference_mode()
def bench_linear() -> None:
    from matryoshka_lora.engine.cpu_kernels import load_step_ops

    c_ops = load_step_ops()
    print(
        "\n1. linear, µs per call, cache-cold (a decode step reads each weight once from memory):\n"
        "   x @ W (MKL, row-major [in, out]) vs PackedLinear (oneDNN, packed for 16 rows) vs PanelLinear (cpu_gemm.c)"
    )
    print(f"{'weight':10s} {'rows':>5s} {'x @ W':>9s} {'oneDNN':>9s} {'C panels':>9s} {'C/oneDNN':>9s}")
    for name, (i, o) in LINEARS.items():
        weight = torch.randn(o, i)
        w_t = weight.t().contiguous()
        packed = PackedLinear(weight, batch_size_hint=16)
        panels = c_ops.pack_linear(weight) if c_ops.name == "c-kernels" else None
        for rows in (1, 16, 64, 300):
            x = torch.randn(rows, i)
            n = 10 if name == "lm_head" and rows == 300 else 30
            plain, onednn = per_call_us(torch.matmul, x, w_t, n=n, cold=True), per_call_us(packed, x, n=n, cold=True)
            c = per_call_us(panels, x, n=n, cold=True) if panels is not None else float("nan")
            print(f"{name:10s} {rows:5d} {plain:9.0f} {onednn:9.0f} {c:9.0f} {onednn / c:8.2f}x")


def expand_block(y, x, lora_A, block_B) -> None:
    y.addmm_(x @ lora_A, block_B)


def expand_per_member(y, x, lora_A, members) -> None:
    h, k = x @ lora_A, len(members)
    for m, (lora_B, c0, c1) in enumerate(members):
        y[:, c0:c1].addmm_(h[:, m::k], lora_B)


@torch.inference_mode()
def bench_lora_layout(rows: int = 16, r_max: int = 64) -> None:
    print(f"\n2. LoRA shrink + expand, {rows} rows, cache-cold, µs per call: block-structured B vs B per member")
    print(f"{'group':8s} {'rank':>5s} {'block B':>9s} {'per member':>11s}")
    for name, (i, outs) in LORA_GROUPS.items():
        k, out = len(outs), sum(outs)
        lora_A = torch.randn(i, k * r_max)
        members, block, col = [], torch.zeros(k * r_max, out), 0
        for m, width in enumerate(outs):
            b = torch.randn(r_max, width)
            block[m::k, col : col + width] = b
            members.append((b, col, col + width))
            col += width
        x, y = torch.randn(rows, i), torch.zeros(rows, out)
        for rank in (8, 64):
            a, blk = lora_A[:, : k * rank], block[: k * rank]
            per_rank = [(b[:rank], c0, c1) for b, c0, c1 in members]
            block_us = per_call_us(expand_block, y, x, a, blk, cold=True)
            member_us = per_call_us(expand_per_member, y, x, a, per_rank, cold=True)
            print(f"{name:8s} {rank:5d} {block_us:9.0f} {member_us:11.0f}")


@torch.inference_mode()
def bench_kernels(r_max: int = 64) -> None:
    from types import SimpleNamespace

    from matryoshka_lora.engine.attention import build_decode_meta
    from matryoshka_lora.engine.cpu_kernels import CKernelOps, load_step_ops
    from matryoshka_lora.engine.kv_cache import KVCache
    from matryoshka_lora.engine.lora_batch import build_groups, build_segments
    from matryoshka_lora.engine.lora_ops import FusedLoRA
    from matryoshka_lora.engine.torch_ops import TorchOps

    ref, fused = TorchOps(), load_step_ops()
    if fused.name == "torch":
        print("\n3. C kernels: not available here (see the log)")
        return
    # the C kernels alone: every LoRA group in ml_lora_group, however wide (the engine's default op set sends
    # groups of one rank from MIN_MKL_LORA_ROWS rows to MKL, which is the torch column)
    serial, threads = CKernelOps(fused.lib, 1, None), torch.get_num_threads()
    fused = CKernelOps(fused.lib, None, None)
    print(f"\n3. fused C kernels (1 thread, {threads} threads) vs torch ops, µs per call")
    print(f"{'':44s} {'torch':>7s} {'C 1 thr':>8s} {f'C {threads} thr':>8s}")
    x, w = torch.randn(16, HIDDEN), torch.randn(HIDDEN)
    print(
        f"{'RMSNorm, 16 rows':44s} {per_call_us(ref.rms_norm, x, w, 1e-5):7.0f} "
        f"{per_call_us(fused.rms_norm, x, w, 1e-5):8.0f}"
    )
    spec = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)
    kv = KVCache(spec, 16, 512)
    kv.cache.normal_()
    meta = SimpleNamespace(decode=build_decode_meta(list(range(16)), list(range(16)), [90 + i for i in range(16)]))
    q, out = torch.randn(16, 9, 64), torch.empty(16, 9, 64)

    def attention_30_layers(ops):
        for layer in range(30):
            ops.decode_attention(q, layer, meta, kv, out)

    print(
        f"{'decode attention, 16 seqs x 30 layers':44s} "
        + " ".join(
            f"{per_call_us(attention_30_layers, ops, n=20, cold=True):{w}.0f}"
            for ops, w in ((ref, 7), (serial, 8), (fused, 8))
        )
    )
    layer = []
    for i, outs in LORA_GROUPS.values():
        members, col = [], 0
        for width in outs:
            members.append((torch.randn(r_max, width) * 0.02, col, col + width))
            col += width
        layer.append((FusedLoRA(torch.randn(i, len(outs) * r_max) * 0.02, tuple(members)), i, col))
    cases = {
        "16 rows at rank 1": [(0, 16, 0, 1, 1.0)],
        "16 rows at rank 64": [(0, 16, 0, 64, 1.0)],
        "4 rows at rank 64": [(0, 4, 0, 64, 1.0)],
        "8 rows at ranks 1/8/32/64 (masked)": [(2 * j, 2 * j + 2, 0, r, 1.0) for j, r in enumerate((1, 8, 32, 64))],
        **{f"{n} rows at rank {r} (prefill)": [(0, n, 0, r, 1.0)] for n in (32, 64, 128, 512) for r in (1, 8, 64)},
    }
    for case, rows in cases.items():
        groups = build_groups(build_segments(rows))
        n = rows[-1][1]
        data = [(torch.zeros(n, out), torch.randn(n, i), w) for w, i, out in layer]
        timings = []
        for ops, width in ((ref, 7), (serial, 8), (fused, 8)):  # each op set over the adapter in its own layout
            inputs = [(y, x, [ops.pack_lora(w)]) for y, x, w in data]
            timings.append(f"{per_call_us(lora_layer, ops.lora_grouped_, inputs, groups, cold=True):{width}.0f}")
        print(f"{'LoRA layer, ' + case:44s} " + " ".join(timings))


def lora_layer(op, inputs, groups) -> None:
    """The grouped LoRA op over every module group of one layer."""
    for y, x, weights in inputs:
        op(y, x, groups, weights)


def bench_steps(threads: int) -> None:
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.adapters.store import load_adapter
    from matryoshka_lora.engine.adapter_slots import AdapterSlots, fuse_adapter
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.cpu_kernels import CKernelOps
    from matryoshka_lora.engine.engine import LLMEngine
    from matryoshka_lora.engine.model_runner import ModelRunner, StepItem
    from matryoshka_lora.engine.torch_ops import TorchOps
    from matryoshka_lora.engine.weights import fuse_weights
    from matryoshka_lora.models import load_base_model

    model, tokenizer = load_base_model(None)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ops-"))
    paths = [save_random_adapter(model, tmp / n, n, 64, seed=s, std=0.02) for s, n in enumerate(("a", "b"))]
    engine = LLMEngine(
        EngineConfig(
            adapters=[str(p) for p in paths], max_num_seqs=16, max_model_len=512, num_threads=threads, warmup=False
        ),
        hf_model=model,
        tokenizer=tokenizer,
    )
    slot_a, slot_b = (engine.adapters.get(n).slot for n in ("a", "b"))

    def items(kind: str) -> list[StepItem]:
        out = []
        for i in range(16):
            if kind == "base":
                slot, rank = -1, 0
            elif kind == "mixed":
                slot, rank = (slot_a, slot_b)[i % 2], (1, 8, 32, 64)[i % 4]
            else:
                slot, rank = slot_a, int(kind)
            out.append(StepItem([100 + i], i, 100, True, slot, rank, 1.0 if rank else 0.0))
        return out

    cases = {
        "base": (items("base"), 64),
        "rank 1": (items("1"), 64),
        "rank 64": (items("64"), 64),
        "mixed, masked groups": (items("mixed"), 64),
        "mixed, a group per rank": (items("mixed"), 0),
    }
    c_ops = engine.runner.ops
    onednn = fuse_weights(model, batch_size_hint=16)  # the torch ops' linears: oneDNN-packed weights
    torch_adapters = AdapterSlots(engine.weights.spec, engine.adapters.max_adapters)  # the torch ops' layout
    for path in paths:  # installed in the engine's order: the same slots
        adapter = load_adapter(path)
        torch_adapters.install(
            adapter.manifest.name,
            adapter.manifest,
            str(path),
            fuse_adapter(engine.weights.spec, adapter.weights, adapter.manifest.r_max, TorchOps().pack_lora),
        )
    runners = {  # one KV cache; each op set with the linears and adapters it packs
        "torch ops": ModelRunner(onednn, engine.kv, torch_adapters.table, TorchOps()),
        "C, oneDNN lin.": ModelRunner(onednn, engine.kv, engine.adapters.table, c_ops),
        "C 1 thread": ModelRunner(engine.weights, engine.kv, engine.adapters.table, CKernelOps(c_ops.lib, 1)),
        f"C {threads} threads": engine.runner,
    }
    times: dict[tuple[str, str], list[float]] = {(name, o): [] for name in cases for o in runners}
    for repeat in range(12):  # interleaved, so drift hits every case alike
        for name, (its, max_masked_rows) in cases.items():
            for o, runner in runners.items():
                runner.max_masked_rows = max_masked_rows
                started = time.perf_counter()
                runner.run(runner.prepare(its))
                if repeat >= 2:
                    times[name, o].append(time.perf_counter() - started)
    print("\n4. decode step, 16 sequences at context 100, real SmolLM2 weights, ms (median of 10)")
    print(f"{'':26s} " + " ".join(f"{o:>14s}" for o in runners))
    for name in cases:
        print(f"{name:26s} " + " ".join(f"{statistics.median(times[name, o]) * 1e3:14.1f}" for o in runners))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step", action="store_true", help="also time whole decode steps on the default model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, oneDNN {torch.backends.mkldnn.is_available()}")
    bench_linear()
    bench_lora_layout()
    bench_kernels()
    if args.step:
        bench_steps(args.threads)


if __name__ == "__main__":
    main()
