"""Hugging Face Llama-family checkpoint -> the engine's fused, pre-transposed weight layout.

Layout (each a frozen `Linear`, y = x @ W.T + b, W as nn.Linear stores it: [out, in]; stored as the
step's op set packs it: linear.PackedLinear for the torch ops, cpu_linear.PanelLinear for the C kernels,
cpu_linear.BlockLinear where the GGUF file's own blocks are given):
    qkv      [(num_heads + 2 * num_kv_heads) * head_dim, hidden]   = [q_proj; k_proj; v_proj] (+ bias)
    o        [hidden, num_heads * head_dim]
    gate_up  [2 * intermediate, hidden]                            = [gate_proj; up_proj]
    down     [hidden, intermediate]
    lm_head  [vocab, hidden]  (a copy of the embedding when the checkpoint ties them)
cos/sin tables come from HF's own rotary-embedding module, so every rope variant it knows works.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from matryoshka_lora.engine.gguf_weights import BlockWeight, concat
from matryoshka_lora.engine.linear import PackedLinear
from matryoshka_lora.errors import ConfigError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

Linear = Callable[[torch.Tensor], torch.Tensor]  # a frozen linear layer: x [T, in] -> x @ W.T + b [T, out]


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one target module by short name."""
        h, i = self.hidden_size, self.intermediate_size
        shapes = {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        return shapes[module]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass
class ModelWeights:
    spec: ModelSpec
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: Linear  # hidden -> vocab
    rotary: torch.nn.Module  # HF's rotary embedding: (x, position_ids) -> (cos, sin)


def check_supported(config, class_name: str | None = None) -> None:
    """Refuse architectures the fused forward does not implement, naming the supported ones."""
    archs = tuple(getattr(config, "architectures", None) or ()) + ((class_name,) if class_name else ())
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConfigError("model architecture", archs or config.model_type, list(SUPPORTED_ARCHITECTURES))
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError("hidden_act", act, ["silu"])
    if getattr(config, "mlp_bias", False):
        raise ConfigError("mlp_bias", True, [False])
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise ConfigError(
            "sliding_window", window, f"None or >= max_position_embeddings ({config.max_position_embeddings})"
        )


def model_spec(config) -> ModelSpec:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelSpec(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
    )


def _w(linear: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    return linear.weight.detach().to(dtype)


def _b(linear: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor | None:
    return linear.bias.detach().to(dtype) if linear.bias is not None else None


def fuse_weights(
    hf_model: torch.nn.Module,
    dtype: torch.dtype = torch.float32,
    batch_size_hint: int = 16,
    pack_linear: Callable[..., Linear] = PackedLinear,
    blocks: dict[str, BlockWeight] | None = None,
) -> ModelWeights:
    """Copy a loaded HF CausalLM's weights into the fused, packed layout (the HF model can be dropped after).

    pack_linear(weight, bias, batch_size_hint, blocks=...): stores each frozen linear; the step's op set
    decides (TorchOps / CKernelOps.pack_linear: oneDNN's packed weight, the C kernels' float32 panels,
    or the GGUF blocks). blocks: {HF parameter name: the same weight as GGUF blocks}
    (gguf_weights.read_blocks); a fused linear gets blocks only when every member has them.
    """
    config = hf_model.config
    check_supported(config, type(hf_model).__name__)
    spec = model_spec(config)
    base = hf_model.model
    blocks = blocks or {}
    prefix = {id(m): n for n, m in hf_model.named_modules()}

    def linear(modules: tuple[torch.nn.Linear, ...], bias: torch.Tensor | None = None) -> Linear:
        weight = torch.cat([_w(m, dtype) for m in modules]) if len(modules) > 1 else _w(modules[0], dtype)
        fused_blocks = concat([blocks.get(f"{prefix[id(m)]}.weight") for m in modules])
        if fused_blocks is None:
            return pack_linear(weight, bias, batch_size_hint)
        return pack_linear(weight, bias, batch_size_hint, blocks=fused_blocks)

    layers = []
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        qkv_bias = torch.cat([_b(p, dtype) for p in projections]) if attn.q_proj.bias is not None else None
        layers.append(
            LayerWeights(
                input_norm=layer.input_layernorm.weight.detach().to(dtype).clone(),
                qkv=linear(projections, qkv_bias),
                o=linear((attn.o_proj,), _b(attn.o_proj, dtype)),
                post_norm=layer.post_attention_layernorm.weight.detach().to(dtype).clone(),
                gate_up=linear((mlp.gate_proj, mlp.up_proj)),
                down=linear((mlp.down_proj,)),
            )
        )
    embed = base.embed_tokens.weight.detach().to(dtype).clone()
    lm_head = linear((hf_model.lm_head,))
    return ModelWeights(spec, embed, layers, base.norm.weight.detach().to(dtype).clone(), lm_head, base.rotary_emb)


def rope_tables(weights: ModelWeights, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_len, head_dim] for positions 0..max_len-1, computed by HF's module."""
    positions = torch.arange(max_len).unsqueeze(0)
    dummy = torch.zeros(1, dtype=weights.embed.dtype)
    with torch.no_grad():
        cos, sin = weights.rotary(dummy, positions)
    return cos[0].contiguous(), sin[0].contiguous()
