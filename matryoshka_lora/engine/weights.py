"""Hugging Face Llama-family checkpoint -> the engine's fused, pre-transposed weight layout.

Layout (every matmul is `x @ W`):
    qkv      [hidden, (num_heads + 2 * num_kv_heads) * head_dim]   = [q_proj.T | k_proj.T | v_proj.T]
    o        [num_heads * head_dim, hidden]
    gate_up  [hidden, 2 * intermediate]                            = [gate_proj.T | up_proj.T]
    down     [intermediate, hidden]
    lm_head  [hidden, vocab]  (a transposed view of the embedding when the checkpoint ties them)
cos/sin tables come from HF's own rotary-embedding module, so every rope variant it knows works.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from matryoshka_lora.errors import ConfigError

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


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
            "q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }
        return shapes[module]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class ModelWeights:
    spec: ModelSpec
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # [hidden, vocab]
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
        raise ConfigError("sliding_window", window, f"None or >= max_position_embeddings ({config.max_position_embeddings})")


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


def _t(linear: torch.nn.Linear) -> torch.Tensor:
    return linear.weight.detach().t().contiguous()


def fuse_weights(hf_model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> ModelWeights:
    """Copy a loaded HF CausalLM's weights into the fused layout (the HF model can be dropped after)."""
    config = hf_model.config
    check_supported(config, type(hf_model).__name__)
    spec = model_spec(config)
    base = hf_model.model
    layers = []
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = torch.cat([_t(attn.q_proj), _t(attn.k_proj), _t(attn.v_proj)], dim=1)
        bias = None
        if attn.q_proj.bias is not None:
            bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).detach().to(dtype)
        o_bias = attn.o_proj.bias.detach().to(dtype).clone() if attn.o_proj.bias is not None else None
        layers.append(LayerWeights(
            input_norm=layer.input_layernorm.weight.detach().to(dtype).clone(),
            qkv=qkv.to(dtype),
            qkv_bias=bias,
            o=_t(attn.o_proj).to(dtype),
            o_bias=o_bias,
            post_norm=layer.post_attention_layernorm.weight.detach().to(dtype).clone(),
            gate_up=torch.cat([_t(mlp.gate_proj), _t(mlp.up_proj)], dim=1).to(dtype),
            down=_t(mlp.down_proj).to(dtype),
        ))
    embed = base.embed_tokens.weight.detach().to(dtype).clone()
    head = hf_model.lm_head.weight.detach()
    tied = head.data_ptr() == base.embed_tokens.weight.data_ptr()
    lm_head = embed.t() if tied else head.to(dtype).t().contiguous()
    return ModelWeights(spec, embed, layers, base.norm.weight.detach().to(dtype).clone(), lm_head, base.rotary_emb)


def rope_tables(weights: ModelWeights, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_len, head_dim] for positions 0..max_len-1, computed by HF's module."""
    positions = torch.arange(max_len).unsqueeze(0)
    dummy = torch.zeros(1, dtype=weights.embed.dtype)
    with torch.no_grad():
        cos, sin = weights.rotary(dummy, positions)
    return cos[0].contiguous(), sin[0].contiguous()
