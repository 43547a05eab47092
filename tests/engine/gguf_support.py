"""Write a model's weights as a llama.cpp-style GGUF file (Q4_1 linears, Q8_0 token embedding), for tests.

llama.cpp's converter permutes q_proj / k_proj rows for its rope (`LlamaModel.permute`); this writes them
the same way, so reading them back exercises the inverse the engine applies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

LINEARS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rows -> GGUF rows."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: torch.nn.Module, path: Path) -> Path:
    """Quantise model's linears (Q4_1) and token embedding (Q8_0) into a GGUF file at path, and set model's
    weights to the values the file decodes to (as the engine's float32 path sees a GGUF model)."""
    import gguf

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.alignment", 32)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])  # a string array, as real files have
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for hf, name in LINEARS.items():
                linear = layer.get_submodule(hf)
                rows = np.arange(linear.weight.shape[0])
                if name in ("attn_q", "attn_k"):  # gguf row j holds HF row perm[j]
                    rows = llama_cpp_permute(rows, heads if name == "attn_q" else kv_heads)
                raw = gguf.quants.quantize(linear.weight.detach().numpy()[rows], gguf.GGMLQuantizationType.Q4_1)
                writer.add_tensor(f"blk.{i}.{name}.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
                decoded = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
                linear.weight.copy_(torch.from_numpy(decoded[np.argsort(rows)]))
        embed = model.get_input_embeddings().weight
        raw = gguf.quants.quantize(embed.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        embed.copy_(torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
