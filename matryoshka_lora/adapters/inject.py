"""Attach `LoRALinear`s to a Hugging Face model by target module names, and reach them afterwards.

inject_lora(model, r_max, ...)   every nn.Linear whose last name part is a target -> LoRALinear;
                                 everything but lora_A / lora_B frozen
set_p / set_inference_ranks      broadcast to every LoRA layer
lora_state_dict                  {"<module path>.lora_A": A, "<module path>.lora_B": B}
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from matryoshka_lora.adapters.layer import LoRALinear, Ranks
from matryoshka_lora.errors import AdapterFormatError, ConfigError, TargetModuleError

log = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted short names (last path part) of the model's nn.Linear modules: what a target may name."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def inject_lora(
    model: nn.Module,
    r_max: int,
    scaling: str = "none",
    target_modules=DEFAULT_TARGET_MODULES,
    alpha: float = 1.0,
    seed: int | None = None,
) -> dict[str, LoRALinear]:
    """Replace each targeted nn.Linear with a LoRALinear (in place); return them by full module path.

    Every parameter of the model except lora_A / lora_B is frozen. `seed` makes the A init reproducible
    (layers are initialised in module-path order from one generator); None uses torch's global RNG.
    """
    targets = tuple(target_modules)
    if isinstance(target_modules, str) or not targets:
        raise ConfigError("target_modules", target_modules, "a non-empty sequence of module names")
    if lora_layers(model):
        raise ConfigError("model", "a model that already has LoRA layers", "a model without LoRA layers")
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }
    matched = {name.rsplit(".", 1)[-1] for name in found}
    missing = [t for t in targets if t not in matched]
    if missing:
        raise TargetModuleError("target module", missing, linear_module_names(model))
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    layers = {}
    for name in sorted(found):
        layer = LoRALinear(found[name], r_max, scaling, alpha)
        layer.reset_lora_parameters(generator)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers[name] = layer
    log.debug("injected LoRA (r_max=%d, scaling=%s) into %d modules", r_max, scaling, len(layers))
    return layers


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model by full module path (empty if none)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def set_p(model: nn.Module, p: torch.Tensor) -> None:
    """Set the training diagonal p of every LoRA layer."""
    for layer in lora_layers(model).values():
        layer.set_p(p)


def set_inference_ranks(model: nn.Module, ranks: Ranks) -> None:
    """Set the inference rank(s) of every LoRA layer (see LoRALinear.set_inference_ranks); no-op without any."""
    for layer in lora_layers(model).values():
        layer.set_inference_ranks(ranks)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<path>.lora_A": A [in, r_max], "<path>.lora_B": B [r_max, out]} (the live Parameters' data)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = layer.lora_A.data, layer.lora_B.data
    return out


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy A / B into the model's LoRA layers; strict: the keys and shapes must match exactly."""
    current = lora_state_dict(model)
    missing = sorted(set(current) - set(tensors))
    extra = sorted(set(tensors) - set(current))
    if missing or extra:
        raise AdapterFormatError(
            f"LoRA tensors do not match the model's LoRA layers: missing {missing[:6]}{'...' if len(missing) > 6 else ''}"
            f" ({len(missing)}), unexpected {extra[:6]}{'...' if len(extra) > 6 else ''} ({len(extra)})"
        )
    for key, target in current.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise AdapterFormatError(
                f"LoRA tensor {key!r}: shape {tuple(tensors[key].shape)}, the model needs {tuple(target.shape)}"
            )
    with torch.no_grad():
        for key, target in current.items():
            target.copy_(tensors[key])
