"""PEFT interop: export a rank-R slice as a standard PEFT LoRA adapter; import a PEFT adapter by SVD.

Export (rank R, module P, our A [in, r_max], B [r_max, out], factor c = manifest.served_scale(R)):

    base_model.model.P.lora_A.weight = A[:, :R].T      [R, in]
    base_model.model.P.lora_B.weight = B[:R].T         [out, R]
    adapter_config.json: r = R, lora_alpha = c * R     (PEFT scales by lora_alpha / r = c)

Import (PEFT r, per module, c = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora):

    delta = c * B_peft @ A_peft = U diag(S) V^T        [out, in], S decreasing (thin SVD via two QRs)
    A = V * sqrt(S)   [in, r]      B = sqrt(S)[:, None] * U^T   [r, out]      (scaling none, alpha 1)

so every leading slice A[:, :k], B[:k] is the best rank-k approximation of the PEFT update
(Eckart-Young), and k = r reproduces it exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from matryoshka_lora.adapters.nest import svd_nest
from matryoshka_lora.adapters.p import default_train_ranks
from matryoshka_lora.adapters.store import Adapter, AdapterManifest, load_adapter, save_adapter
from matryoshka_lora.errors import AdapterFormatError, ConfigError, InvalidRankError

log = logging.getLogger(__name__)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<kind>[AB])\.weight$")


def export_peft(adapter: Adapter | str | os.PathLike, rank: int, out_dir: str | os.PathLike) -> Path:
    """Write the rank-`rank` slice of `adapter` (an Adapter or its directory) as a PEFT LoRA adapter."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    m = adapter.manifest
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= m.r_max:
        raise InvalidRankError(rank, f"1..{m.r_max}", adapter=m.name)
    factor = m.served_scale(rank)
    config = LoraConfig(
        r=rank,
        lora_alpha=factor * rank,
        target_modules=list(m.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=m.base_model,
        inference_mode=True,
    )
    tensors = {}
    for path, (lora_A, lora_B) in sorted(adapter.weights.items()):
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = lora_A[:, :rank].T.float().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = lora_B[:rank].T.float().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{PEFT_WEIGHTS_FILE}.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / PEFT_WEIGHTS_FILE)
    config.save_pretrained(str(out))
    log.info("exported %r at rank %d (PEFT lora_alpha=%g) to %s", m.name, rank, config.lora_alpha, out)
    return out


def read_peft_config(peft_dir: Path) -> dict:
    """adapter_config.json, refusing what a plain LoRA delta cannot express."""
    file = peft_dir / PEFT_CONFIG_FILE
    if not file.is_file():
        raise AdapterFormatError(f"{peft_dir} is not a PEFT adapter directory: {PEFT_CONFIG_FILE} is missing")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{file} is not valid JSON: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise ConfigError("PEFT peft_type", config.get("peft_type"), ["LORA"])
    refused = {
        "use_dora": (config.get("use_dora"), "false (DoRA is not a plain low-rank delta)"),
        "bias": (config.get("bias", "none"), "'none' (bias training is not part of a LoRA delta)"),
        "lora_bias": (config.get("lora_bias"), "false"),
        "fan_in_fan_out": (config.get("fan_in_fan_out"), "false (nn.Linear layout)"),
        "modules_to_save": (config.get("modules_to_save"), "none (fully trained modules cannot be imported)"),
        "rank_pattern": (config.get("rank_pattern"), "empty (one r for every module)"),
        "alpha_pattern": (config.get("alpha_pattern"), "empty (one lora_alpha for every module)"),
        "layer_replication": (config.get("layer_replication"), "none"),
    }
    for key, (value, allowed) in refused.items():
        if value not in (None, False, "none", {}, []):
            raise ConfigError(f"PEFT {key}", value, allowed)
    r, lora_alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError("PEFT r", r, "an integer >= 1")
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or lora_alpha <= 0:
        raise ConfigError("PEFT lora_alpha", lora_alpha, "a number > 0")
    return config


def read_peft_weights(peft_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = peft_dir / PEFT_WEIGHTS_FILE
    if file.is_file():
        try:
            return load_file(str(file))
        except Exception as exc:  # safetensors raises several types for a corrupt file
            raise AdapterFormatError(f"{file} is not a readable safetensors file: {exc}") from exc
    legacy = peft_dir / "adapter_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise AdapterFormatError(f"{peft_dir}: neither {PEFT_WEIGHTS_FILE} nor adapter_model.bin found")


def peft_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"base_model.model.P.lora_A.weight": ..., "...lora_B.weight": ...} -> {P: (A_peft [r, in], B_peft [out, r])}."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            bad.append(key)
        else:
            found.setdefault(match["path"], {})[match["kind"]] = tensor
    if bad:
        raise AdapterFormatError(f"PEFT weights hold tensors a LoRA import cannot use: {sorted(bad)[:6]}")
    half = sorted(p for p, kinds in found.items() if len(kinds) != 2)
    if half:
        raise AdapterFormatError(f"PEFT weights: modules with only one of lora_A / lora_B: {half[:6]}")
    if not found:
        raise AdapterFormatError("PEFT weights hold no LoRA tensors")
    return {p: (kinds["A"], kinds["B"]) for p, kinds in sorted(found.items())}


def svd_factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, factor: float, r_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (A [in, r_max], B [r_max, out]) for delta = factor * lora_B @ lora_A (PEFT layout), nested by SVD."""
    r = lora_A.shape[0]
    pad_A = torch.zeros(lora_A.shape[1], r_max, dtype=torch.float64)
    pad_B = torch.zeros(r_max, lora_B.shape[0], dtype=torch.float64)
    pad_A[:, :r], pad_B[:r] = lora_A.double().T, lora_B.double().T
    nested_A, nested_B = svd_nest(pad_A, pad_B, torch.full((r_max,), float(factor), dtype=torch.float64))
    return nested_A.float(), nested_B.float()


def import_peft(
    peft_dir: str | os.PathLike, out_dir: str | os.PathLike, base_model: nn.Module, name: str | None = None
) -> Adapter:
    """Convert a PEFT LoRA adapter for `base_model` into our format by SVD (see the module docstring)."""
    from matryoshka_lora.models import model_fingerprint, model_id

    peft_dir = Path(peft_dir)
    config = read_peft_config(peft_dir)
    r, lora_alpha = config["r"], config["lora_alpha"]
    factor = lora_alpha / math.sqrt(r) if config.get("use_rslora") else lora_alpha / r
    weights = {}
    for path, (peft_A, peft_B) in peft_pairs(read_peft_weights(peft_dir)).items():
        module = _linear(base_model, path)
        if tuple(peft_A.shape) != (r, module.in_features) or tuple(peft_B.shape) != (module.out_features, r):
            raise AdapterFormatError(
                f"PEFT module {path!r}: lora_A {tuple(peft_A.shape)}, lora_B {tuple(peft_B.shape)}; with r={r} the "
                f"base model needs lora_A ({r}, {module.in_features}), lora_B ({module.out_features}, {r})"
            )
        weights[path] = svd_factors(peft_A, peft_B, factor, r)
    manifest = AdapterManifest(
        name=name or _adapter_name(peft_dir),
        base_model=model_id(base_model),
        base_fingerprint=model_fingerprint(base_model),
        target_modules=tuple(sorted({p.rsplit(".", 1)[-1] for p in weights})),
        r_max=r,
        train_ranks=default_train_ranks(r),
        scaling="none",
        method="svd",
        alpha=1.0,
        notes=f"imported from PEFT adapter {peft_dir} (r={r}, lora_alpha={lora_alpha}, "
        f"use_rslora={bool(config.get('use_rslora'))}) by SVD: each rank-k slice is the best rank-k approximation",
    )
    out = save_adapter(out_dir, manifest, weights)
    return Adapter(manifest, weights, out)


def _linear(model: nn.Module, path: str):
    try:
        module = model.get_submodule(path)
    except AttributeError as exc:
        raise AdapterFormatError(f"PEFT module {path!r} does not exist in the base model") from exc
    if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
        raise AdapterFormatError(f"PEFT module {path!r} is a {type(module).__name__}, not a linear layer")
    return module


def _adapter_name(peft_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", peft_dir.resolve().name).lstrip("._-")[:64]
    return name or "imported"
