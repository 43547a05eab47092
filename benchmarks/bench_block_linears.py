"""The model's linears per weight format, one layer type at a time, cache-cold: GB/s of weights read.

    .venv/bin/python benchmarks/bench_block_linears.py [--rows 1,2,6,16] [--threads 2]

For each of qkv, o, gate_up, down (all 30 layers called in turn, so each call finds its weights out of
cache, as in a decode step) and the lm_head: ms per call and GB/s of the weight bytes it reads, for the
GGUF blocks (cpu_linear.BlockLinear), the float32 panels (cpu_linear.PanelLinear) and the packed
bfloat16 copy (bf16_linear.Bf16Linear, AMX where the CPU has it) of the same weights, best of
--repeats; where the blocks' int8 rows run on AMX tiles, also the blocks on the library built without
them (-DML_NO_AMX: VNNI dot products, the same bits), which sets cpu_gemm.h's MIN_AMX_ROWS. The row
count where bf16 overtakes the blocks sets bf16_linear.MIN_WIDE_ROWS. Compare with
benchmarks/bench_stream.py's read roof.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,3,4,6,8,16,64,256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from matryoshka_lora.engine import cpu_kernels
    from matryoshka_lora.engine.bf16_linear import Bf16Linear, bf16_linear_supported
    from matryoshka_lora.engine.cpu_kernels import load_step_ops
    from matryoshka_lora.engine.cpu_linear import BlockLinear, PanelLinear
    from matryoshka_lora.engine.gguf_weights import concat, read_blocks
    from matryoshka_lora.models import default_gguf_path, load_base_model

    model, _ = load_base_model(None)
    ops = load_step_ops()
    blocks = read_blocks(default_gguf_path(), model)
    layers = range(model.config.num_hidden_layers)

    def fused(*names):
        return [concat([blocks[f"model.layers.{i}.{n}.weight"] for n in names]) for i in layers]

    sets = {
        "qkv": fused("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "o": fused("self_attn.o_proj"),
        "gate_up": fused("mlp.gate_proj", "mlp.up_proj"),
        "down": fused("mlp.down_proj"),
        "lm_head": [blocks["lm_head.weight"]] * 4,
    }
    threads = lambda: args.threads  # noqa: E731
    print(f"{args.threads} threads; ms per call (GB/s of weights read)")
    vnni = cpu_kernels._load(cpu_kernels.build_library(("-DML_NO_AMX",))) if ops.lib.ml_blocks_min_amx_rows() else None
    names = ["gguf", "float32"] + (["bf16"] if bf16_linear_supported() else []) + (["vnni"] if vnni else [])
    titles = {"gguf": "gguf blocks", "float32": "float32 panels", "bf16": "bf16 packed", "vnni": "gguf, no AMX"}
    header = "  f32/gguf  gguf/bf16" + ("  vnni/gguf" if vnni else "")
    print(f"{'linear':8s} {'rows':>4s} " + " ".join(f"{titles[n]:>20s}" for n in names) + header)
    for name, weights in sets.items():
        formats = {
            "gguf": [BlockLinear(ops.lib, w, None, threads) for w in weights],
            "float32": [PanelLinear(ops.lib, w.dequantize(), None, threads) for w in weights],
        }
        if "bf16" in names:
            formats["bf16"] = [Bf16Linear(w.dequantize()) for w in weights]
        if vnni:
            formats["vnni"] = [BlockLinear(vnni, w, None, threads) for w in weights]
        nbytes = {f: linears[0].num_bytes for f, linears in formats.items() if f != "float32"}
        nbytes["float32"] = formats["float32"][0].panels.numel() * 4
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, weights[0].shape[1])
            best = {}
            for _ in range(args.repeats):
                for fmt, linears in formats.items():
                    started = time.perf_counter()
                    for linear in linears:
                        linear(x)
                    elapsed = (time.perf_counter() - started) / len(linears)
                    best[fmt] = min(best.get(fmt, elapsed), elapsed)
            cells = [f"{best[f] * 1e3:8.3f} ({nbytes[f] / best[f] / 1e9:5.1f})" for f in names]
            ratio = f"{best['gguf'] / best['bf16']:9.2f}x" if "bf16" in best else ""
            ratio += f" {best['vnni'] / best['gguf']:9.2f}x" if "vnni" in best else ""
            line = f"{name:8s} {rows:4d} " + " ".join(f"{c:>20s}" for c in cells)
            print(f"{line}  {best['float32'] / best['gguf']:7.2f}x {ratio}")


if __name__ == "__main__":
    main()
