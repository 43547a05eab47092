"""Which weights the base model's linears compute on (EngineConfig.weight_format), decided once at load.

"float32"    dequantised float32 panels (the reference)
"gguf"       the GGUF file's own Q4_1 / Q8_0 blocks (cpu_linear.BlockLinear)
"gguf+bf16"  the blocks for steps of few rows, a packed bfloat16 copy for wide ones (bf16_linear)
"auto"       gguf+bf16 where the CPU has AMX bf16 tiles, else gguf, where the model has a GGUF file
             that the engine loaded itself and the C kernels' AVX2 GEMM runs; else float32
"""

from __future__ import annotations

from matryoshka_lora.engine.bf16_linear import amx_bf16_supported, bf16_linear_supported
from matryoshka_lora.engine.config import EngineConfig
from matryoshka_lora.engine.gguf_weights import read_blocks
from matryoshka_lora.errors import ConfigError


def base_blocks(config: EngineConfig, ops, hf_model, loaded_from_config: bool) -> dict | None:
    """The GGUF blocks the linears are computed on (config.weight_format), or None for float32.

    "auto" looks for config.model's GGUF file only when the engine loaded config.model itself (a model
    handed in may be another one); read_blocks keeps only tensors equal to hf_model's in any case."""
    from matryoshka_lora.models import gguf_source

    if config.weight_format == "float32":
        return None
    vectorized = getattr(ops, "vectorized", False)
    source = gguf_source(config.model)
    on_blocks = config.weight_format in ("gguf", "gguf+bf16")
    if on_blocks and (source is None or not vectorized):
        raise ConfigError(
            "weight_format",
            config.weight_format,
            "float32 or auto: "
            + (
                "the C kernels' AVX2 GEMM is not running here"
                if source is not None
                else f"no single .gguf file found for model {config.model!r}"
            ),
        )
    if source is None or not vectorized or (config.weight_format == "auto" and not loaded_from_config):
        return None
    blocks = read_blocks(source, hf_model)
    if not blocks and on_blocks:
        raise ConfigError(
            "weight_format", config.weight_format, f"float32 or auto: no tensor of {source.name} equals the model's"
        )
    return blocks or None


def auto_formats() -> tuple[str, ...]:
    """What "auto" tries, best first, where the model has a GGUF file: gguf+bf16 only on AMX."""
    return (("gguf+bf16",) if amx_bf16_supported() else ()) + ("gguf", "float32")


def resolve_format(config: EngineConfig, ops, hf_model, loaded_from_config: bool) -> tuple[str, dict | None]:
    """(the format the linears compute on: "float32" | "gguf" | "gguf+bf16", the GGUF blocks or None);
    ConfigError for a format asked for that cannot run here."""
    if config.weight_format == "gguf+bf16" and not bf16_linear_supported():
        raise ConfigError("weight_format", "gguf+bf16", "gguf, float32 or auto: oneDNN has no bfloat16 linear here")
    blocks = base_blocks(config, ops, hf_model, loaded_from_config)
    if blocks is None:
        return "float32", None
    wanted = auto_formats()[0] if config.weight_format == "auto" else config.weight_format
    return ("gguf+bf16" if wanted == "gguf+bf16" else "gguf"), blocks
