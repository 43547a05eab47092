"""gguf_weights: the GGUF header reader, the block parser (== gguf's own dequantiser), the rope row order
(== transformers' inverse), and read_blocks on a written file and on the shipped one."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

from matryoshka_lora.engine.gguf_weights import BlockWeight, _parse, concat, read_blocks, rope_rows, tensor_table

from .gguf_support import llama_cpp_permute, write_gguf

KINDS = {"Q4_1": gguf.GGMLQuantizationType.Q4_1, "Q8_0": gguf.GGMLQuantizationType.Q8_0}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (48, 576)])
def test_parse_equals_gguf_dequantize(kind, shape):
    w = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32)
    raw = gguf.quants.quantize(w, KINDS[kind])
    block = _parse(kind, raw, shape)
    assert block.kind == kind and block.shape == shape
    assert torch.equal(block.dequantize(), torch.from_numpy(gguf.quants.dequantize(raw, KINDS[kind])))


@pytest.mark.parametrize("rows,heads", [(8, 1), (32, 4), (64, 2), (576, 9)])
def test_rope_rows_undo_llama_cpp_permute(rows, heads):
    hf = np.arange(rows)
    gguf_rows = llama_cpp_permute(hf, heads)
    assert np.array_equal(gguf_rows[rope_rows(rows, heads).numpy()], hf)


def test_concat_stacks_rows_of_one_kind():
    a = _parse("Q4_1", gguf.quants.quantize(np.ones((2, 32), np.float32), KINDS["Q4_1"]), (2, 32))
    b = _parse("Q4_1", gguf.quants.quantize(-np.ones((3, 32), np.float32), KINDS["Q4_1"]), (3, 32))
    c = _parse("Q8_0", gguf.quants.quantize(np.ones((1, 32), np.float32), KINDS["Q8_0"]), (1, 32))
    both = concat([a, b])
    assert both.shape == (5, 32) and torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    assert concat([a, c]) is None and concat([a, None]) is None and concat([]) is None


@pytest.fixture
def gguf_model(tiny_model, tmp_path):
    """The tiny Llama (hidden 32, intermediate 64) with its weights as a written GGUF file decodes them."""
    tiny_model.config.tie_word_embeddings = True
    return tiny_model, write_gguf(tiny_model, tmp_path / "tiny.gguf")


def test_tensor_table_reads_every_block_tensor(gguf_model):
    model, path = gguf_model
    table = tensor_table(path)
    assert len(table) == 7 * model.config.num_hidden_layers + 1
    kind, dims, raw = table["token_embd.weight"]
    assert kind == 8 and dims == (32, model.config.vocab_size) and raw.shape == (model.config.vocab_size, 34)


def test_read_blocks_finds_every_linear_bit_exact(gguf_model):
    model, path = gguf_model
    blocks = read_blocks(path, model)
    assert len(blocks) == 7 * model.config.num_hidden_layers + 1  # every linear and the tied lm_head
    for name, param in model.named_parameters():
        if name in blocks:
            assert torch.equal(blocks[name].dequantize(), param.detach())
    assert blocks["lm_head.weight"].kind == "Q8_0" and isinstance(blocks["lm_head.weight"], BlockWeight)


def test_read_blocks_leaves_out_a_weight_that_differs(gguf_model, caplog):
    model, path = gguf_model
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    with caplog.at_level(logging.WARNING):
        blocks = read_blocks(path, model)
    assert "model.layers.1.mlp.up_proj.weight" not in blocks
    assert len(blocks) == 7 * model.config.num_hidden_layers and "do not match" in caplog.text


def test_tensor_table_refuses_a_non_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        tensor_table(path)


@pytest.mark.slow
def test_shipped_gguf_blocks_equal_the_float_weights(default_model):
    """Every linear of the shipped Q4_1 file (and its Q8_0 tied lm_head) decodes to the loaded float32 weight."""
    from matryoshka_lora.models import default_gguf_path

    model, _ = default_model
    blocks = read_blocks(default_gguf_path(), model)
    assert len(blocks) == 7 * model.config.num_hidden_layers + 1
    assert {b.kind for b in blocks.values()} == {"Q4_1", "Q8_0"}
