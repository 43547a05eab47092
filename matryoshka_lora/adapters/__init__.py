"""Nested-rank LoRA adapters: the diagonal p, the layer, injection, the on-disk format, PEFT I/O."""

from matryoshka_lora.adapters.inject import (
    DEFAULT_TARGET_MODULES,
    inject_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    set_inference_ranks,
    set_p,
)
from matryoshka_lora.adapters.layer import LoRALinear
from matryoshka_lora.adapters.p import (
    Method,
    Scaling,
    binary_matryoshka_delta,
    build_p,
    default_train_ranks,
    normalize_train_ranks,
    rank_scale,
    sample_dylora_rank,
)
from matryoshka_lora.adapters.store import (
    FORMAT_VERSION,
    Adapter,
    AdapterManifest,
    adapter_from_model,
    attach_adapter,
    load_adapter,
    save_adapter,
    update_eval_results,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "FORMAT_VERSION",
    "Adapter",
    "AdapterManifest",
    "LoRALinear",
    "Method",
    "Scaling",
    "adapter_from_model",
    "attach_adapter",
    "binary_matryoshka_delta",
    "build_p",
    "default_train_ranks",
    "inject_lora",
    "load_adapter",
    "load_lora_state_dict",
    "lora_layers",
    "lora_state_dict",
    "normalize_train_ranks",
    "rank_scale",
    "sample_dylora_rank",
    "save_adapter",
    "set_inference_ranks",
    "set_p",
    "update_eval_results",
]
