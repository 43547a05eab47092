"""This machine's memory bandwidth, STREAM-style: the roof a decode step's weight bytes are measured against.

    .venv/bin/python benchmarks/bench_stream.py [--threads 2] [--mib 512]

Compiles a small C kernel (cc -O3 -march=native -fopenmp) and times, over arrays far larger than the
caches, best of --repeats:
    read    s += a[i]                  bytes: 4 per element (what a linear's weights cost: read only)
    copy    c[i] = a[i]                bytes: 8 (read + write; write-allocate not counted, as STREAM)
    triad   a[i] = b[i] + q * c[i]     bytes: 12
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

SOURCE = r"""
#include <stdint.h>
float ml_read(const float *a, int64_t n, int threads) {
    float s = 0.0f;
#pragma omp parallel for reduction(+:s) num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) s += a[i];
    return s;
}
void ml_copy(float *c, const float *a, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) c[i] = a[i];
}
void ml_triad(float *a, const float *b, const float *c, float q, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) a[i] = b[i] + q * c[i];
}
"""


def build() -> ctypes.CDLL:
    directory = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    (directory / "stream.c").write_text(SOURCE)
    lib = directory / "stream.so"
    subprocess.run(
        [
            "cc",
            "-O3",
            "-march=native",
            "-ffast-math",
            "-fopenmp",
            "-fPIC",
            "-shared",
            "-o",
            str(lib),
            str(directory / "stream.c"),
        ],
        check=True,
    )
    return ctypes.CDLL(str(lib))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mib", type=int, default=512, help="size of each array")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import torch

    lib = build()
    lib.ml_read.restype = ctypes.c_float
    n = args.mib * 2**20 // 4
    a, b, c = (torch.rand(n) for _ in range(3))
    p = ctypes.c_void_p
    i64, f32, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_int
    kernels = {
        "read": (4, lambda: lib.ml_read(p(a.data_ptr()), i64(n), i32(args.threads))),
        "copy": (8, lambda: lib.ml_copy(p(c.data_ptr()), p(a.data_ptr()), i64(n), i32(args.threads))),
        "triad": (
            12,
            lambda: lib.ml_triad(
                p(a.data_ptr()), p(b.data_ptr()), p(c.data_ptr()), f32(0.5), i64(n), i32(args.threads)
            ),
        ),
    }
    print(f"{args.threads} threads, {args.mib} MiB arrays, best of {args.repeats}")
    for name, (bytes_per, run) in kernels.items():
        run()
        best = min(_timed(run) for _ in range(args.repeats))
        print(f"{name:6s} {bytes_per * n / best / 1e9:6.1f} GB/s")


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
