"""The adapter format: a directory with `manifest.json` and `adapter.safetensors`.

    adapter.safetensors   for each wrapped module path P: P.lora_A [in, r_max], P.lora_B [r_max, out]
    manifest.json         AdapterManifest (name, base model + fingerprint, targets, r_max, train ranks,
                          scaling, method, alpha, format version, eval results, notes, rank scales)

The rank-r adapter is A[:, :r], B[:r] scaled by `served_scale(r)` = alpha * s_r * c_r, where c_r is
the per-rank serving scale fitted after training (`rank_scales`, default 1 for every rank). `load_adapter` checks everything it can
without the model (and the base fingerprint when given); `attach_adapter` checks the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from matryoshka_lora.adapters import inject
from matryoshka_lora.adapters.layer import LoRALinear
from matryoshka_lora.adapters.p import METHODS, SCALINGS, served_scale
from matryoshka_lora.errors import AdapterFormatError, BaseModelMismatchError, ConfigError, is_int

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "adapter.safetensors"
MANIFEST_METHODS = METHODS + ("svd",)  # "svd": imported from a PEFT adapter (peft_io.import_peft)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

REQUIRED_FIELDS = (
    "name",
    "base_model",
    "base_fingerprint",
    "target_modules",
    "r_max",
    "train_ranks",
    "scaling",
    "method",
    "format_version",
)

Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]


def check_rank_scales(scales, r_max: int) -> dict[str, float]:
    """{rank: c} with ranks in 1..r_max (int or decimal string keys) and c finite > 0 -> {"rank": float}."""
    allowed = f"a JSON object {{rank in 1..{r_max}: a finite number > 0}}"
    if not isinstance(scales, dict):
        raise ConfigError("rank_scales", scales, allowed)
    out = {}
    for key, value in scales.items():
        rank = key if is_int(key) else int(key) if isinstance(key, str) and key.isdigit() else None
        if (
            rank is None
            or not 1 <= rank <= r_max
            or not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ConfigError("rank_scales", scales, allowed)
        out[str(rank)] = float(value)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


@dataclass
class AdapterManifest:
    name: str
    base_model: str
    base_fingerprint: str
    target_modules: tuple[str, ...]
    r_max: int
    train_ranks: tuple[int, ...]
    scaling: str
    method: str
    alpha: float = 1.0
    format_version: int = FORMAT_VERSION
    eval_results: dict | None = None
    notes: str = ""
    rank_scales: dict[str, float] | None = None  # {"r": c_r}; a rank not listed has c_r = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; ConfigError names the field, what it got and what it allows."""
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise ConfigError(
                "adapter name", self.name, "1-64 characters of A-Z a-z 0-9 . _ -, not starting with . _ -"
            )
        for what in ("base_model", "base_fingerprint"):
            if not isinstance(getattr(self, what), str) or not getattr(self, what):
                raise ConfigError(what, getattr(self, what), "a non-empty string")
        targets = self.target_modules
        if (
            isinstance(targets, str)
            or not isinstance(targets, (list, tuple))
            or not targets
            or not all(isinstance(t, str) and t for t in targets)
            or len(set(targets)) != len(targets)
        ):
            raise ConfigError("target_modules", targets, "a non-empty list of distinct module names")
        self.target_modules = tuple(targets)
        if not is_int(self.r_max) or self.r_max < 1:
            raise ConfigError("r_max", self.r_max, "an integer >= 1")
        ranks = self.train_ranks
        if (
            not isinstance(ranks, (list, tuple))
            or not ranks
            or not all(is_int(r) for r in ranks)
            or list(ranks) != sorted(set(ranks))
            or ranks[0] < 1
            or ranks[-1] > self.r_max
        ):
            raise ConfigError("train_ranks", ranks, f"a non-empty increasing list of distinct ranks in 1..{self.r_max}")
        self.train_ranks = tuple(ranks)
        if self.scaling not in SCALINGS:
            raise ConfigError("scaling", self.scaling, list(SCALINGS))
        if self.method not in MANIFEST_METHODS:
            raise ConfigError("method", self.method, list(MANIFEST_METHODS))
        if (
            not isinstance(self.alpha, (int, float))
            or isinstance(self.alpha, bool)
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ConfigError("alpha", self.alpha, "a finite number > 0")
        self.alpha = float(self.alpha)
        if self.format_version != FORMAT_VERSION or not is_int(self.format_version):
            raise ConfigError("format_version", self.format_version, [FORMAT_VERSION])
        if self.eval_results is not None and not isinstance(self.eval_results, dict):
            raise ConfigError("eval_results", self.eval_results, "a JSON object or null")
        if not isinstance(self.notes, str):
            raise ConfigError("notes", self.notes, "a string")
        if self.rank_scales is not None:
            self.rank_scales = check_rank_scales(self.rank_scales, self.r_max)

    def rank_scales_by_rank(self) -> dict[int, float]:
        """rank_scales with integer keys ({} when none are fitted)."""
        return {int(r): c for r, c in (self.rank_scales or {}).items()}

    def served_scale(self, rank: int) -> float:
        """alpha * s_rank * c_rank: the factor of the rank-r delta as every backend serves it (p.served_scale)."""
        return served_scale(rank, self.scaling, self.alpha, self.rank_scales_by_rank())

    def to_json(self) -> str:
        values = asdict(self)
        values["target_modules"], values["train_ranks"] = list(self.target_modules), list(self.train_ranks)
        return json.dumps(values, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "AdapterManifest":
        """Parse and validate; every problem is an AdapterFormatError saying what is wrong."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AdapterFormatError(f"{MANIFEST_FILE} is not valid JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise AdapterFormatError(f"{MANIFEST_FILE} must hold a JSON object, got {type(values).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [k for k in REQUIRED_FIELDS if k not in values]
        unknown = sorted(set(values) - set(names))
        if missing or unknown:
            raise AdapterFormatError(
                f"{MANIFEST_FILE}: missing fields {missing}, unknown fields {unknown}; allowed fields: {names}"
            )
        if values["format_version"] != FORMAT_VERSION:
            raise AdapterFormatError(
                f"{MANIFEST_FILE}: unknown format_version {values['format_version']!r}; this version reads {FORMAT_VERSION}"
            )
        try:
            return cls(**values)
        except ConfigError as exc:
            raise AdapterFormatError(f"{MANIFEST_FILE}: {exc}") from exc


@dataclass
class Adapter:
    manifest: AdapterManifest
    weights: Weights  # module path -> (A [in, r_max], B [r_max, out])
    path: Path | None = None


def check_weights(manifest: AdapterManifest, weights: Weights) -> None:
    """Shapes agree with r_max and each other, values are finite floats, and every target is present."""
    if not weights:
        raise AdapterFormatError(f"adapter {manifest.name!r} has no LoRA tensors")
    seen = set()
    for path, (lora_A, lora_B) in weights.items():
        short = path.rsplit(".", 1)[-1]
        if short not in manifest.target_modules:
            raise AdapterFormatError(
                f"module {path!r} is not one of the manifest's target_modules {list(manifest.target_modules)}"
            )
        seen.add(short)
        for key, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
                raise AdapterFormatError(
                    f"{path}.{key}: expected a 2-D float tensor, got {getattr(t, 'shape', t)!r} "
                    f"{getattr(t, 'dtype', type(t).__name__)}"
                )
        if lora_A.shape[1] != manifest.r_max or lora_B.shape[0] != manifest.r_max:
            raise AdapterFormatError(
                f"{path}: A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)} do not match "
                f"r_max={manifest.r_max}; expected A [in, {manifest.r_max}], B [{manifest.r_max}, out]"
            )
        if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
            raise AdapterFormatError(f"{path}: LoRA weights hold NaN or infinite values")
    absent = [t for t in manifest.target_modules if t not in seen]
    if absent:
        raise AdapterFormatError(f"adapter {manifest.name!r}: no tensors for target modules {absent}")


def _flatten(weights: Weights) -> dict[str, torch.Tensor]:
    out = {}
    for path, (lora_A, lora_B) in sorted(weights.items()):
        out[f"{path}.lora_A"] = lora_A.detach().cpu().contiguous()
        out[f"{path}.lora_B"] = lora_B.detach().cpu().contiguous()
    return out


def _unflatten(tensors: dict[str, torch.Tensor]) -> Weights:
    paths, bad = set(), []
    for key in tensors:
        path, _, kind = key.rpartition(".")
        if kind in ("lora_A", "lora_B") and path:
            paths.add(path)
        else:
            bad.append(key)
    if bad:
        raise AdapterFormatError(
            f"{WEIGHTS_FILE}: unexpected tensors {sorted(bad)[:6]}; expected only '<module>.lora_A' / '<module>.lora_B'"
        )
    missing = sorted(f"{p}.{k}" for p in paths for k in ("lora_A", "lora_B") if f"{p}.{k}" not in tensors)
    if missing:
        raise AdapterFormatError(f"{WEIGHTS_FILE}: missing tensors {missing[:6]} ({len(missing)})")
    return {p: (tensors[f"{p}.lora_A"], tensors[f"{p}.lora_B"]) for p in sorted(paths)}


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_adapter(out_dir: str | os.PathLike, manifest: AdapterManifest, weights: Weights) -> Path:
    """Write the adapter to `out_dir`, atomically.

    A new directory is written whole under a temporary name and renamed. Into an existing directory
    (e.g. a Trainer checkpoint, which holds other files), each file is written to a temporary name and
    renamed over the old one, tensors first, manifest last.
    """
    from safetensors.torch import save_file

    manifest.validate()
    check_weights(manifest, weights)
    out = Path(out_dir)
    tensors = _flatten(weights)
    metadata = {"format": "pt", "matryoshka_format_version": str(FORMAT_VERSION)}
    if out.exists():
        if not out.is_dir():
            raise AdapterFormatError(f"{out} exists and is not a directory")
        tmp = out / f".{WEIGHTS_FILE}.tmp{os.getpid()}"
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out / WEIGHTS_FILE)
        _write_text_atomic(out / MANIFEST_FILE, manifest.to_json())
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = out.with_name(f".{out.name}.tmp{os.getpid()}")
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir()
        save_file(tensors, str(tmp_dir / WEIGHTS_FILE), metadata=metadata)
        (tmp_dir / MANIFEST_FILE).write_text(manifest.to_json())
        os.replace(tmp_dir, out)
    log.info(
        "saved adapter %r (%s, r_max=%d, %d modules) to %s",
        manifest.name,
        manifest.method,
        manifest.r_max,
        len(weights),
        out,
    )
    return out


def read_manifest(path: str | os.PathLike) -> AdapterManifest:
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"adapter directory {path} does not exist")
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise AdapterFormatError(f"{path} is not an adapter directory: {MANIFEST_FILE} is missing")
    try:
        return AdapterManifest.from_json(file.read_text())
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from exc


def load_adapter(path: str | os.PathLike, base_fingerprint: str | None = None) -> Adapter:
    """Read and validate an adapter directory. With `base_fingerprint`, refuse another base model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    if base_fingerprint is not None and manifest.base_fingerprint != base_fingerprint:
        raise BaseModelMismatchError(manifest.name, manifest.base_fingerprint, base_fingerprint)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise AdapterFormatError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{file} is not a readable safetensors file: {exc}") from exc
    weights = _unflatten(tensors)
    try:
        check_weights(manifest, weights)
    except AdapterFormatError as exc:
        raise AdapterFormatError(f"{path}: {exc}") from exc
    return Adapter(manifest, weights, path)


def update_manifest(path: str | os.PathLike, **changes) -> AdapterManifest:
    """Replace manifest fields (e.g. eval_results, rank_scales), validated, written atomically; returns it."""
    manifest = read_manifest(path)
    for key, value in changes.items():
        if key not in {f.name for f in fields(AdapterManifest)}:
            raise ConfigError("manifest field", key, [f.name for f in fields(AdapterManifest)])
        setattr(manifest, key, value)
    manifest.validate()
    json.dumps(asdict(manifest))  # fail before writing if not JSON-able
    _write_text_atomic(Path(path) / MANIFEST_FILE, manifest.to_json())
    return manifest


def update_eval_results(path: str | os.PathLike, results: dict | None) -> AdapterManifest:
    """Replace the manifest's eval_results (atomically); returns the new manifest."""
    return update_manifest(path, eval_results=results)


def adapter_from_model(model: nn.Module, manifest: AdapterManifest) -> Adapter:
    """The model's current LoRA weights (float32 CPU copies) as an Adapter described by `manifest`."""
    weights = {
        name: (layer.lora_A.detach().float().cpu().clone(), layer.lora_B.detach().float().cpu().clone())
        for name, layer in inject.lora_layers(model).items()
    }
    check_weights(manifest, weights)
    return Adapter(manifest, weights, None)


def attach_adapter(model: nn.Module, adapter: Adapter, check_fingerprint: bool = True) -> dict[str, LoRALinear]:
    """Inject LoRA layers as the manifest says and load the weights; refuses another base model."""
    from matryoshka_lora.models import model_fingerprint

    m = adapter.manifest
    if check_fingerprint:
        actual = model_fingerprint(model)
        if actual != m.base_fingerprint:
            raise BaseModelMismatchError(m.name, m.base_fingerprint, actual)
    layers = inject.inject_lora(model, m.r_max, m.scaling, m.target_modules, m.alpha)
    for layer in layers.values():
        layer.rank_scales = m.rank_scales_by_rank()
    tensors = {}
    for path, (lora_A, lora_B) in adapter.weights.items():
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = lora_A, lora_B
    inject.load_lora_state_dict(model, tensors)
    return layers


def adapter_dirs(path: str | os.PathLike) -> list[Path]:
    """An adapter directory (it holds manifest.json) -> [it]; a folder of adapter directories -> each of them."""
    path = Path(path).expanduser()
    if (path / MANIFEST_FILE).is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / MANIFEST_FILE).is_file()) if path.is_dir() else []
    if not found:
        raise AdapterFormatError(f"{path} holds no adapter: no {MANIFEST_FILE} in it or in its subdirectories")
    return found
