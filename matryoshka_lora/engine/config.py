"""EngineConfig: every knob of the native engine, validated once where it enters."""

from __future__ import annotations

from dataclasses import dataclass, field

from matryoshka_lora.errors import ConfigError, check_count

DEFAULT_MAX_MODEL_LEN = 2048
WEIGHT_FORMATS = ("auto", "gguf", "gguf+bf16", "float32")
ADAPTER_DTYPES = ("auto", "bfloat16")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")
# Budget-controller layers that can be switched off, for A/B runs of what each one buys:
#   typical   `--budget-unmet refuse` refuses on the typical (median) prediction instead of the margin's
#   headroom  a rank above the lowest only while a next request like this one would still fit at the lowest
BUDGET_LAYERS = ("typical", "headroom")


def check_layers_off(layers_off) -> tuple[str, ...]:
    """The budget layers to switch off, as a tuple; ConfigError names any unknown one."""
    layers = tuple(layers_off)
    unknown = [layer for layer in layers if layer not in BUDGET_LAYERS]
    if unknown:
        raise ConfigError("budget layers off", unknown, list(BUDGET_LAYERS))
    return layers


@dataclass
class EngineConfig:
    """Settings of one engine instance.

    model: a local Hugging Face directory, or None for the embedded default model.
    adapters: adapter directories; a directory holding several adapter subdirectories loads each.
    max_num_seqs: sequences running at once (= KV cache slots).
    max_model_len: prompt + output tokens per sequence; None = min(2048, the model's maximum).
    max_num_batched_tokens: tokens per forward step (decode tokens + prefill chunks).
    max_queue_len: waiting requests before `generate` raises QueueFullError.
    max_adapters: adapters loaded at once.
    num_threads: torch intra-op threads; None leaves torch's default.
    fused_kernels: run the model's linears, the decode LoRA groups, RMSNorm, RoPE + KV-cache write and
        decode attention as C kernels (compiled once with the system C compiler; falls back to torch ops
        and oneDNN linears, with a warning, without one).
    weight_format: how the C kernels store the base model's linears: "gguf" computes on the GGUF file's
        own Q4_1 / Q8_0 blocks (the embedded default's file, or the one .gguf in a model directory; same
        results as float32, ~5x fewer bytes per step), "gguf+bf16" on the blocks for steps of few rows
        (decode) and on a packed bfloat16 copy for wide ones (prefill, many sequences; ~0.3 % error per
        linear, engine/bf16_linear.py), "float32" on dequantised float32 panels (the reference), "auto"
        on gguf+bf16 where the CPU has AMX bf16 tiles, else on the blocks, where there is a GGUF file and
        the C kernels run, else float32.
    adapter_dtype: how the adapters' weights are stored: "auto" as saved (bfloat16 where every weight of
        a module group is a bfloat16 value, else float32), "bfloat16" every weight rounded to bfloat16 at
        load (half the bytes a step reads of a float32 adapter; each weight within 2^-9 of itself).
    kv_cache_dtype: what the KV cache stores: "float32", or "bfloat16" (half the bytes a decode step reads
        per token of context; K and V rounded to bfloat16 as they are written, attention computed in
        float32); "auto" = float32.
    seed: seeds the sampler of requests that carry no seed.
    budget_layers_off: budget-controller layers switched off, for A/B runs (BUDGET_LAYERS).
    warmup: run the warm-up and cost-model calibration at start.
    """

    model: str | None = None
    adapters: list[str] = field(default_factory=list)
    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_num_batched_tokens: int = 512
    max_queue_len: int = 1024
    max_adapters: int = 16
    num_threads: int | None = None
    fused_kernels: bool = True
    weight_format: str = "auto"
    adapter_dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    seed: int = 0
    budget_layers_off: tuple[str, ...] = ()
    warmup: bool = True

    def __post_init__(self) -> None:
        self.adapters = [str(a) for a in self.adapters]
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_queue_len", "max_adapters"):
            check_count(name, getattr(self, name))
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError("max_model_len", self.max_model_len, "None or an integer >= 2")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ConfigError("weight_format", self.weight_format, list(WEIGHT_FORMATS))
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError("adapter_dtype", self.adapter_dtype, list(ADAPTER_DTYPES))
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError("kv_cache_dtype", self.kv_cache_dtype, list(KV_CACHE_DTYPES))
        check_count("num_threads", self.num_threads, allow_none=True)
        self.budget_layers_off = check_layers_off(self.budget_layers_off)

    def resolve_max_model_len(self, model_max: int) -> int:
        """The effective max_model_len: the configured one (refused above the model's), else min(2048, model's)."""
        if self.max_model_len is None:
            return min(DEFAULT_MAX_MODEL_LEN, model_max)
        if self.max_model_len > model_max:
            raise ConfigError(
                "max_model_len", self.max_model_len, f"<= the model's max_position_embeddings {model_max}"
            )
        return self.max_model_len
