"""The C kernels of `cpu_kernels.c` and `cpu_gemm.c`: built once per machine with the system C compiler,
loaded with ctypes.

    ops = load_step_ops(enabled=True)   # CKernelOps, or TorchOps where no compiler / not x86-64 / disabled

The shared library is compiled with `-O3 -march=native -fopenmp` into `<cache>/kernels/` (see
models.cache_root; a temporary directory when that is not writable), named by a hash of the sources,
the flags and the compiler, so a new source or another CPU builds its own copy and concurrent starts do
not clash. It links `libgomp.so.1` by name, and torch (imported first) has already loaded its own copy of
that library, so the kernels' threads are torch's OpenMP pool, not a second one competing for the
cores. A compiler without OpenMP builds it single-threaded.
`CKernelOps` has the same methods and semantics as the reference `torch_ops.TorchOps`; tests hold
them equal (its pack_linear / pack_lora make its own layouts of the weights, which its ops read).
The kernels are float32 only: other dtypes get TorchOps.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from matryoshka_lora.engine.attention import AttentionMeta
from matryoshka_lora.engine.cpu_linear import BlockLinear, PanelLinear
from matryoshka_lora.engine.gguf_weights import BlockWeight
from matryoshka_lora.engine.kv_cache import KVCache
from matryoshka_lora.engine.lora_ops import FusedLoRA, LoRAGroup, lora_grouped_
from matryoshka_lora.engine.lora_panels import PanelLoRA
from matryoshka_lora.engine.torch_ops import TorchOps
from matryoshka_lora.engine.weights import ModelSpec

log = logging.getLogger(__name__)

# From this many rows a LoRA group of one rank (a prefill chunk) runs faster as two MKL matmuls on plain
# float32 weights than in ml_lora_group (in the engine, the shipped bf16 r32 adapter, 2 threads: at 128
# rows the C kernel is ahead at ranks 1-8, at 256 rows MKL at ranks 1-32; benchmarks/bench_ops.py, "LoRA
# layer, N rows at rank r (prefill)", shows the same crossing on cache-cold float32 weights).
MIN_MKL_LORA_ROWS = 256

SOURCES = tuple(
    Path(__file__).with_name(n)
    for n in ("cpu_kernels.c", "cpu_gemm.c", "cpu_gemm_blocks.c", "cpu_gemm_int8.c", "cpu_gemm_amx.c", "cpu_decode.c")
)
HEADERS = tuple(Path(__file__).with_name(n) for n in ("cpu_gemm.h", "cpu_kernels.h"))
FLAGS = (
    "-O3",
    "-march=native",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-ffp-contract=fast",
)
i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "ml_rms_norm": (None, [ptr, i64, ptr, ptr, i64, i64, f32]),
    "ml_silu_mul": (None, [ptr, i64, i64, ptr]),
    "ml_argmax_rows": (None, [ptr, i64, i64, i64, ptr, i64]),
    "ml_rope_and_cache": (None, [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64]),
    "ml_decode_attention": (
        ctypes.c_int,
        [ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, f32, i64, i64],
    ),
    "ml_lora_group": (
        None,
        [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, ptr, f32, ptr, ptr, ptr, ptr, i64, ptr, i64, i64],
    ),
    "ml_linear": (None, [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, i64]),
    "ml_linear_blocks": (None, [ptr, i64, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64]),
    "ml_decode_layers": (
        ctypes.c_int,
        [ptr, i64, i64, ptr, ptr, f32, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr, f32, ptr]
        + [ptr, i64],
    ),
    "ml_gemm_vectorized": (ctypes.c_int, []),
    "ml_blocks_max_int8_rows": (ctypes.c_int, []),
    "ml_blocks_min_amx_rows": (ctypes.c_int, []),
}


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded (the engine then runs its torch ops)."""


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise KernelBuildError("no C compiler found (tried $CC, cc, gcc, clang); install gcc for the fused kernels")


def _build_dir() -> Path:
    from matryoshka_lora.models import cache_root

    for root in (cache_root() / "kernels", Path(tempfile.gettempdir()) / f"matryoshka-lora-kernels-{os.getuid()}"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return root
        except OSError:
            continue
    raise KernelBuildError("no writable directory for the compiled kernels")


def build_library(extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the C sources (once per source, flags, compiler and CPU) and return the .so path.

    extra_flags: more compiler flags (tests build the portable GEMM with -DML_PORTABLE_GEMM).
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        raise KernelBuildError(f"unsupported machine {platform.machine()!r}")
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256(
        b"".join(s.read_bytes() for s in SOURCES + HEADERS)
        + " ".join(flags).encode()
        + version.encode()
        + platform.processor().encode()
        + _cpu_model().encode()
    ).hexdigest()[:16]
    directory = _build_dir()
    target = directory / f"cpu_kernels-{key}.so"
    if target.is_file():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    errors = ""
    for extra in (["-fopenmp"], []):  # a compiler without OpenMP (clang without libomp) builds it serial
        result = subprocess.run(
            [cc, *flags, *extra, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            break
        errors = result.stderr.strip()[-2000:]
    else:
        os.unlink(tmp)
        raise KernelBuildError(f"{cc} failed: {errors}")
    if not extra:
        log.warning("%s could not build with -fopenmp: the fused kernels run on one thread (%s)", cc, errors[-200:])
    os.replace(tmp, target)  # atomic: concurrent builders each write their own tmp
    log.info("built the fused CPU kernels: %s", target)
    return target


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return ""


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


class CKernelOps(TorchOps):
    """TorchOps with RMSNorm, SiLU-mul, RoPE + cache write, decode attention, the LoRA groups (over PanelLoRA:
    pack_lora) and the model's linears (pack_linear: cpu_linear.PanelLinear) in C (cpu_kernels.c, cpu_gemm.c).

    For the engine's float32 CPU tensors in the layouts llama.forward makes (rows with unit stride in
    their last dimension, the KVCache tensor, contiguous cos/sin): the engine checks the dtype once
    (load_step_ops), so the per-call wrappers stay a few microseconds.

    num_threads: the OpenMP threads of decode attention, the LoRA groups and the linears; None follows
    torch.get_num_threads() at each call (the engine's num_threads).
    min_mkl_lora_rows: LoRA groups of one rank and at least this many rows run lora_ops.lora_grouped_ on
    PanelLoRA.fused() (MKL's float32 matmuls; the same sums in another order); None: every group in C.
    """

    name = "c-kernels"

    def __init__(
        self, lib: ctypes.CDLL, num_threads: int | None = None, min_mkl_lora_rows: int | None = MIN_MKL_LORA_ROWS
    ):
        self.lib = lib
        self.num_threads = num_threads
        self.min_mkl_lora_rows = min_mkl_lora_rows
        self.vectorized = bool(lib.ml_gemm_vectorized())  # the AVX2 + FMA GEMMs, else oneDNN's linears
        self._h = torch.empty(0)  # the LoRA groups' scratch (_scratch)

    def threads(self) -> int:
        """The OpenMP threads a call runs on now."""
        return self.num_threads or torch.get_num_threads()

    def pack_linear(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        batch_size_hint: int = 16,
        blocks: BlockWeight | None = None,
    ):
        """The model's frozen linears on the GGUF file's blocks (BlockLinear) where given, else as float32
        panels (PanelLinear); without the AVX2 micro-kernels, or for other dtypes, as TorchOps packs them
        (oneDNN), which beats the portable C loops."""
        if not self.vectorized or weight.dtype != torch.float32:
            return super().pack_linear(weight, bias, batch_size_hint)
        if blocks is not None:
            return BlockLinear(self.lib, blocks, bias, self.threads)
        return PanelLinear(self.lib, weight, bias, self.threads)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows, dim = x.shape
        out = torch.empty((rows, dim), dtype=x.dtype)
        self.lib.ml_rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), rows, dim, eps)
        return out

    def argmax_rows(self, logits: torch.Tensor) -> list[int]:
        if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(-1) != 1:
            return super().argmax_rows(logits)
        out = torch.empty(logits.shape[0], dtype=torch.long)
        self.lib.ml_argmax_rows(
            logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr(), self.threads()
        )
        return out.tolist()

    def silu_mul(self, gu: torch.Tensor) -> torch.Tensor:
        rows, n = gu.shape[0], gu.shape[1] // 2
        if gu.stride(-1) != 1 or gu.stride(0) != 2 * n:
            gu = gu.contiguous()
        out = torch.empty((rows, n), dtype=gu.dtype)
        self.lib.ml_silu_mul(gu.data_ptr(), rows, n, out.data_ptr())
        return out

    @staticmethod
    def _cache_ptrs(kv: KVCache, layer: int) -> tuple[int, int, int]:
        """Addresses of cache[layer, 0] and cache[layer, 1], and the slot stride (elements)."""
        cache = kv.cache
        k = cache.data_ptr() + layer * cache.stride(0) * cache.element_size()
        return k, k + cache.stride(1) * cache.element_size(), cache.stride(2)

    def rope_and_cache(self, qkv: torch.Tensor, spec: ModelSpec, layer: int, meta: AttentionMeta, kv: KVCache):
        k_cache, v_cache, slot_stride = self._cache_ptrs(kv, layer)
        self.lib.ml_rope_and_cache(
            qkv.data_ptr(),
            qkv.shape[0],
            qkv.stride(0),
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            meta.cos.data_ptr(),
            meta.sin.data_ptr(),
            k_cache,
            v_cache,
            meta.slots.data_ptr(),
            meta.positions.data_ptr(),
            slot_stride,
            kv.max_model_len,
            kv.cache.dtype == torch.bfloat16,
        )
        return self.split_qkv(qkv, spec)

    def decode_attention(
        self, q: torch.Tensor, layer: int, meta: AttentionMeta, kv: KVCache, out: torch.Tensor
    ) -> None:
        d = meta.decode
        k_cache, v_cache, slot_stride = self._cache_ptrs(kv, layer)
        status = self.lib.ml_decode_attention(
            q.data_ptr(),
            q.stride(0),
            k_cache,
            v_cache,
            d.rows.data_ptr(),
            d.slots.data_ptr(),
            d.lengths.data_ptr(),
            out.data_ptr(),
            out.stride(0),
            d.rows.shape[0],
            q.shape[1],
            kv.num_kv_heads,
            kv.head_dim,
            slot_stride,
            kv.max_model_len,
            kv.head_dim**-0.5,
            self.threads(),
            kv.cache.dtype == torch.bfloat16,
        )
        if status != 0:
            raise MemoryError("ml_decode_attention could not allocate its scratch buffers")

    def pack_lora(self, w: FusedLoRA) -> PanelLoRA:
        """An adapter group as the C kernel reads it: its panels, the only copy kept (~80 ms for an all-module
        r_max-64 adapter of SmolLM2; fuse_adapter calls it off the engine loop)."""
        return PanelLoRA.pack(w)

    def _scratch(self, size: int) -> int:
        """Address of a float32 buffer of >= size elements, reused across calls (the engine loop is the only caller)."""
        if self._h.numel() < size:
            self._h = torch.empty(max(size, 2 * self._h.numel()))
        return self._h.data_ptr()

    def lora_grouped_(
        self, y: torch.Tensor, x: torch.Tensor, groups: list[LoRAGroup], weights: list[PanelLoRA | None]
    ) -> torch.Tensor:
        """lora_ops.lora_grouped_ over packed weights (pack_lora): one C call per group, or MKL's matmuls for
        a wide group of one rank (min_mkl_lora_rows)."""
        todo = [(g, weights[g.slot]) for g in groups if weights[g.slot] is not None]
        if not todo:  # no adapter of this step has this module group: nothing to read
            return y
        if self.min_mkl_lora_rows is not None:
            wide = [g.row_ranks is None and g.end - g.start >= self.min_mkl_lora_rows for g, _ in todo]
            for (g, w), on_mkl in zip(todo, wide):
                if on_mkl:
                    lora_grouped_(y, x, [g], {g.slot: w.fused()})
            todo = [gw for gw, on_mkl in zip(todo, wide) if not on_mkl]
        threads = self.threads()
        x_ptr, x_stride, y_ptr, y_stride = x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0)
        in_features, item = x.shape[1], x.element_size()
        for g, w in todo:
            rows = g.end - g.start
            h = self._scratch(2 * rows * w.num_members * g.rank)  # the shrink, then its members masked and apart
            a_ptr, b_ptr, c0_ptr, c1_ptr = w.pointers
            self.lib.ml_lora_group(
                x_ptr + g.start * x_stride * item,
                x_stride,
                rows,
                in_features,
                a_ptr,
                w.num_members,
                g.rank,
                w.r_max,
                0 if g.row_ranks is None else g.row_ranks.data_ptr(),
                0 if g.row_scales is None else g.row_scales.data_ptr(),
                g.scale,
                b_ptr,
                c0_ptr,
                c1_ptr,
                y_ptr + g.start * y_stride * item,
                y_stride,
                h,
                threads,
                w.bf16,
            )
        return y


def load_step_ops(enabled: bool = True, dtype: torch.dtype = torch.float32) -> TorchOps:
    """CKernelOps when enabled, float32 and buildable here, else the torch reference ops (reason logged)."""
    if not enabled or dtype != torch.float32:
        log.info("fused CPU kernels off (%s): the step runs torch ops", "disabled" if not enabled else dtype)
        return TorchOps()
    try:
        return CKernelOps(_load(build_library()))
    except (KernelBuildError, OSError, AttributeError) as exc:
        log.warning("fused CPU kernels unavailable (%s): the step runs torch ops, somewhat slower", exc)
        return TorchOps()
