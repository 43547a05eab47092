"""cpu_gemm_blocks.c: BlockLinear on GGUF blocks gives the same bits as PanelLinear on the decoded float32
weight (the AVX2 micro-kernels; the portable ones to float rounding; every row-tile remainder, partial panels,
bias, threads), one row on int8 activations what its float64 reference computes, and an engine on a GGUF
model's blocks generates what its float32 engine does."""

from __future__ import annotations

import pytest
import torch

from matryoshka_lora.engine import cpu_kernels
from matryoshka_lora.engine.bf16_linear import bf16_linear_supported
from matryoshka_lora.engine.cpu_linear import BlockLinear, PanelLinear, pack_blocks
from matryoshka_lora.engine.gguf_weights import BlockWeight

from .engine_support import request, run, tokens

SHAPES = {"tiny": (5, 32), "partial-panel": (40, 64), "qkv": (960, 576), "lm-head-slice": (1000, 576)}
ROWS = [0, 1, 5, 6, 7, 16, 61]


def random_blocks(kind: str, out: int, in_features: int, seed: int) -> BlockWeight:
    """Blocks with float16-representable d and m, as a file has."""
    gen = torch.Generator().manual_seed(seed)
    nkb = in_features // 32
    d = (torch.rand(out, nkb, generator=gen) * 0.05 + 1e-3).half().float()
    if kind == "Q4_1":
        q = torch.randint(0, 16, (out, in_features), generator=gen, dtype=torch.uint8)
        return BlockWeight(kind, q, d, (torch.randn(out, nkb, generator=gen) * 0.2).half().float())
    q = torch.randint(-127, 128, (out, in_features), generator=gen, dtype=torch.int8)
    return BlockWeight(kind, q, d, None)


@pytest.fixture(scope="module", params=["avx2-or-native", "portable"])
def lib(request, c_ops):
    if request.param == "avx2-or-native":
        return c_ops.lib
    return cpu_kernels._load(cpu_kernels.build_library(("-DML_PORTABLE_GEMM",)))


def int8_row_reference(blocks: BlockWeight, x: torch.Tensor) -> torch.Tensor:
    """What rows_int8 computes (cpu_gemm_blocks.c), in float64 from each row of x quantised per block of 32 as it
    does."""
    if x.shape[0] != 1:
        return (
            torch.cat([int8_row_reference(blocks, row[None]) for row in x])
            if x.shape[0]
            else x.new_zeros(0, len(blocks.q))
        )
    num_kb = x.shape[1] // 32
    xb = x.view(num_kb, 32)
    amax = xb.abs().amax(1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    xq = torch.round(xb * inv[:, None])[None].double()
    dx = (amax / torch.tensor(127.0)).double()
    dots = (blocks.q.view(-1, num_kb, 32).double() * xq).sum(-1)  # [out, num_kb]
    y = blocks.d.double() * dx * dots
    if blocks.kind == "Q4_1":
        y = y + blocks.m.double() * xb.sum(1).double()
    return y.sum(1)[None].float()


def int8_row_term_magnitude(blocks: BlockWeight, x: torch.Tensor) -> float:
    """The largest sum of |terms| that one output of rows_int8 adds up (one row of x): float32 sums agree with
    the float64 reference to a few ulps of this, however much the terms cancel."""
    xb = x.view(x.shape[1] // 32, 32).double()
    amax = xb.abs().amax(1)
    q = blocks.q.view(len(blocks.q), -1, 32).double().abs()
    terms = blocks.d.double() * amax * q.sum(-1)  # |d| * |dx * xq| summed over a block, at most
    if blocks.kind == "Q4_1":
        terms = terms + blocks.m.double().abs() * xb.abs().sum(1)
    return float(terms.sum(1).max())


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_block_linear_equals_float32_panels_bit_for_bit(lib, kind, shape, rows, with_bias):
    """Above the int8 rows (all rows without VNNI) the decoded weights' product, bit for bit; int8 rows their own
    reference."""
    out_f, in_f = SHAPES[shape]
    blocks = random_blocks(kind, out_f, in_f, seed=rows + out_f)
    gen = torch.Generator().manual_seed(rows)
    bias = torch.randn(out_f, generator=gen) if with_bias else None
    x = torch.randn(rows, in_f, generator=gen)
    got = BlockLinear(lib, blocks, bias, lambda: 2)(x)
    panels = PanelLinear(lib, blocks.dequantize(), bias, lambda: 2)(x)
    if 1 <= rows <= lib.ml_blocks_max_int8_rows():
        want = int8_row_reference(blocks, x) + (bias if with_bias else 0)
        torch.testing.assert_close(got, want, atol=1e-5 * float(1 + want.abs().max()), rtol=1e-5)  # float32 sums
        assert float((got - panels).norm() / panels.norm()) < 1e-2  # int8 activations: ~0.5 % here
        return
    if lib.ml_gemm_vectorized() and rows != 1:  # the same FMAs in the same order: the same bits
        assert torch.equal(got, panels)
    else:  # one row (block sums first), or plain C loops, which -fassociative-math may reorder
        torch.testing.assert_close(got, panels, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, blocks.dequantize(), bias), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_one_row_equals_the_bit_exact_path(kind, shape):
    """The float one-row kernel (block sums first) against the same library built with ML_EXACT_BLOCKS."""
    exact = cpu_kernels._load(cpu_kernels.build_library(("-DML_EXACT_BLOCKS",)))
    float_row = cpu_kernels._load(cpu_kernels.build_library(("-DML_NO_INT8_ROW",)))
    out_f, in_f = SHAPES[shape]
    blocks = random_blocks(kind, out_f, in_f, seed=out_f)
    x = torch.randn(1, in_f)
    got = BlockLinear(float_row, blocks, None, lambda: 2)(x)
    want = BlockLinear(exact, blocks, None, lambda: 2)(x)
    assert not exact.ml_blocks_max_int8_rows() and not float_row.ml_blocks_max_int8_rows()
    assert torch.equal(want, PanelLinear(exact, blocks.dequantize(), None, lambda: 2)(x))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [2, 8, 9, 16, 21, 32])
def test_int8_rows_do_not_depend_on_the_other_rows(c_ops, kind, rows):
    """Each row of a multi-row int8 step gives the bits it gives alone (the one-user step's)."""
    if c_ops.lib.ml_blocks_max_int8_rows() < rows:
        pytest.skip("no int8 rows for this many rows here")
    blocks = random_blocks(kind, 200, 576, seed=rows)
    x = torch.randn(rows, 576)
    linear = BlockLinear(c_ops.lib, blocks, None, lambda: 2)
    together = linear(x)
    for t in range(rows):
        assert torch.equal(together[t], linear(x[t : t + 1])[0])


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [3, 4, 5, 8, 13, 16, 17, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_amx_tiles_give_the_vnni_bits(c_ops, kind, rows, shape):
    """Steps on AMX tiles (from ml_blocks_min_amx_rows rows) equal the same library built with ML_NO_AMX (VNNI
    dot products of the same int8 rows), bit for bit, partial panels and bias included."""
    if not c_ops.lib.ml_blocks_min_amx_rows():
        pytest.skip("no AMX-INT8 tiles here")
    vnni = cpu_kernels._load(cpu_kernels.build_library(("-DML_NO_AMX",)))
    assert not vnni.ml_blocks_min_amx_rows()
    out_f, in_f = SHAPES[shape]
    blocks = random_blocks(kind, out_f, in_f, seed=rows + 3 * out_f)
    gen = torch.Generator().manual_seed(rows)
    bias, x = torch.randn(out_f, generator=gen), torch.randn(rows, in_f, generator=gen)
    got = BlockLinear(c_ops.lib, blocks, bias, lambda: 2)(x)
    if rows <= vnni.ml_blocks_max_int8_rows():
        assert torch.equal(got, BlockLinear(vnni, blocks, bias, lambda: 2)(x))
    else:  # more rows than VNNI takes: each 16-row tile as VNNI computes those rows alone
        want = torch.cat([BlockLinear(vnni, blocks, bias, lambda: 2)(x[m : m + 16]) for m in range(0, rows, 16)])
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(1, 64),
        torch.full((1, 64), -3.0),
        torch.arange(64.0)[None] - 20,
        torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * 1e4,
        torch.randn(1, 64, generator=torch.Generator().manual_seed(1)) * 1e4,
    ],
    ids=["zeros", "constant", "ramp", "large", "large-2"],
)
def test_int8_row_edge_inputs(c_ops, kind, x):
    """A zero block (scale 0), a block at -amax (xq = -127), exact ramps and large values whose terms cancel."""
    if not c_ops.lib.ml_blocks_max_int8_rows():
        pytest.skip("no AVX512-VNNI + VBMI: one row runs on float activations")
    blocks = random_blocks(kind, 40, 64, seed=7)
    torch.testing.assert_close(
        BlockLinear(c_ops.lib, blocks, None, lambda: 2)(x),
        int8_row_reference(blocks, x),
        atol=1e-6 * int8_row_term_magnitude(blocks, x),  # 2^-24 is 6e-8: ~16 ulps of the summed terms
        rtol=1e-5,
    )


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_block_linear_at_any_thread_count(c_ops, num_threads):
    blocks = random_blocks("Q4_1", 700, 320, seed=num_threads)
    x = torch.randn(9, 320)
    assert torch.equal(
        BlockLinear(c_ops.lib, blocks, None, lambda: num_threads)(x), BlockLinear(c_ops.lib, blocks, None, lambda: 1)(x)
    )


@pytest.mark.parametrize("kind,record_bytes", [("Q4_1", 320), ("Q8_0", 544)])
def test_records_decode_to_the_weight(kind, record_bytes):
    """The record layout of cpu_linear's docstring, decoded here in Python."""
    blocks = random_blocks(kind, 20, 64, seed=3)
    records = pack_blocks(blocks)
    assert records.shape == (2, 2, record_bytes) and records.dtype == torch.uint8
    w = torch.zeros(32, 64)
    for p in range(2):
        for b in range(2):
            rec = records[p, b]
            d = rec[:32].view(torch.float16).float()
            if kind == "Q4_1":
                m, packed = rec[32:64].view(torch.float16).float(), rec[64:].view(32, 8)
                q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()  # [kk, 16]
                w[p * 16 : (p + 1) * 16, b * 32 : (b + 1) * 32] = d[:, None] * q.t() + m[:, None]
            else:
                q = rec[32:].view(torch.int8).view(32, 16).float()
                w[p * 16 : (p + 1) * 16, b * 32 : (b + 1) * 32] = d[:, None] * q.t()
    assert torch.equal(w[:20], blocks.dequantize()) and not w[20:].any()


def test_block_linear_refuses_a_ragged_input():
    with pytest.raises(ValueError, match="in_features % 32"):
        BlockLinear(
            None,
            BlockWeight("Q4_1", torch.zeros(4, 40, dtype=torch.uint8), torch.zeros(4, 1), torch.zeros(4, 1)),
            None,
            lambda: 1,
        )


def test_engine_on_gguf_blocks_generates_what_float32_does(gguf_model_dir, c_ops, monkeypatch):
    """On float activations (the kernels built without int8 rows) the blocks give float32's tokens."""
    from matryoshka_lora.engine import cpu_kernels
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.cpu_linear import BlockLinear as Block
    from matryoshka_lora.engine.engine import LLMEngine

    monkeypatch.setattr(cpu_kernels, "FLAGS", (*cpu_kernels.FLAGS, "-DML_NO_INT8_ROW"))
    outputs = {}
    for weight_format in ("gguf", "float32"):
        engine = LLMEngine(
            EngineConfig(
                model=str(gguf_model_dir), max_num_seqs=4, max_model_len=64, warmup=False, weight_format=weight_format
            )
        )
        assert not engine.runner.ops.lib.ml_blocks_max_int8_rows()
        assert engine.weight_format == weight_format
        assert isinstance(engine.weights.lm_head, Block) == (weight_format == "gguf")
        reqs = [request(i, max_tokens=8) for i in range(4)]
        outputs[weight_format] = {k: tokens(v) for k, v in run(engine, reqs).items()}
    assert outputs["gguf"] == outputs["float32"]


def test_gguf_format_without_a_gguf_file_is_refused(tiny_model_dir):
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine
    from matryoshka_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="weight_format"):
        LLMEngine(EngineConfig(model=str(tiny_model_dir), warmup=False, weight_format="gguf"))
    with pytest.raises(ConfigError, match="weight_format"):
        EngineConfig(weight_format="int3")


def test_without_the_avx2_gemm_the_linears_are_onednn(c_ops):
    """A library built without the AVX2 + FMA micro-kernels (as on a CPU without them) stores the model's
    linears as oneDNN's packed ones (faster than the portable C loops); with them, as panels or blocks."""
    from matryoshka_lora.engine.cpu_kernels import CKernelOps
    from matryoshka_lora.engine.linear import PackedLinear

    portable = CKernelOps(cpu_kernels._load(cpu_kernels.build_library(("-DML_PORTABLE_GEMM",))))
    blocks = random_blocks("Q4_1", 16, 32, seed=0)
    assert not portable.vectorized
    assert isinstance(portable.pack_linear(blocks.dequantize(), None, 16, blocks=blocks), PackedLinear)
    if c_ops.vectorized:
        assert isinstance(c_ops.pack_linear(blocks.dequantize(), None, 16, blocks=blocks), BlockLinear)
        assert isinstance(c_ops.pack_linear(blocks.dequantize(), None, 16), PanelLinear)


@pytest.mark.skipif(not bf16_linear_supported(), reason="oneDNN has no bfloat16 linear on this CPU")
def test_gguf_bf16_format_is_the_blocks_for_narrow_steps_and_bf16_for_wide(gguf_model_dir, c_ops):
    """Every linear of the gguf+bf16 engine gives the gguf engine's bits below its min_rows rows (min_wide_rows)
    and float32's result within bf16 error from it."""
    from matryoshka_lora.engine.bf16_linear import SplitLinear, min_wide_rows
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine

    def linears(weight_format):
        config = EngineConfig(
            model=str(gguf_model_dir), max_num_seqs=4, max_model_len=64, warmup=False, weight_format=weight_format
        )
        engine = LLMEngine(config)
        assert engine.weight_format == weight_format
        layers = [(lw.qkv, lw.o, lw.gate_up, lw.down) for lw in engine.weights.layers]
        return [linear for group in layers for linear in group] + [engine.weights.lm_head]

    split, blocks, reference = linears("gguf+bf16"), linears("gguf"), linears("float32")
    assert all(isinstance(linear, SplitLinear) and linear.min_rows == min_wide_rows(c_ops) for linear in split)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for s, b, f in zip(split, blocks, reference):
            narrow = torch.randn(s.min_rows - 1, s.wide.in_features, generator=gen)
            assert torch.equal(s(narrow), b(narrow))
            wide = torch.randn(s.min_rows + 5, s.wide.in_features, generator=gen)
            assert float((s(wide) - f(wide)).norm() / f(wide).norm()) < 1e-2


def test_gguf_bf16_format_is_refused_without_a_bf16_linear(gguf_model_dir, c_ops, monkeypatch):
    from matryoshka_lora.engine import weight_format
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine
    from matryoshka_lora.errors import ConfigError

    monkeypatch.setattr(weight_format, "bf16_linear_supported", lambda: False)
    with pytest.raises(ConfigError, match="gguf\\+bf16"):
        LLMEngine(EngineConfig(model=str(gguf_model_dir), warmup=False, weight_format="gguf+bf16"))


@pytest.mark.parametrize("amx, expected", [(True, "gguf+bf16"), (False, "gguf")])
def test_auto_format_takes_bf16_for_wide_steps_only_on_amx(gguf_model_dir, c_ops, monkeypatch, amx, expected):
    from matryoshka_lora.engine import weight_format
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine

    if amx and not bf16_linear_supported():
        pytest.skip("oneDNN has no bfloat16 linear on this CPU")
    monkeypatch.setattr(weight_format, "amx_bf16_supported", lambda: amx)
    engine = LLMEngine(EngineConfig(model=str(gguf_model_dir), max_num_seqs=4, max_model_len=64, warmup=False))
    assert engine.weight_format == expected
