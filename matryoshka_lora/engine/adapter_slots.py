"""Loaded adapters, their weights stored once at r_max in the layout of the engine's op set.

Each adapter occupies a slot 0..max_adapters-1. For every layer and fused group
(qkv = q,k,v; o; gate_up = gate,up; down) the table holds one adapter group per slot, or None where
the adapter does not target that group: a `FusedLoRA` (lora_ops) packed by the op set's `pack_lora`
(the torch ops keep it as it is, the C kernels turn it into `lora_panels.PanelLoRA`; one copy either
way). A rank is never a copy: a request at rank r reads the first k * r columns of A and the first r
rows of each member's B.
"""

from __future__ import annotations

import heapq
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from matryoshka_lora.engine.lora_ops import FusedLoRA
from matryoshka_lora.engine.weights import ModelSpec
from matryoshka_lora.errors import AdapterFormatError, ConfigError

log = logging.getLogger(__name__)

GROUP_MEMBERS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
GROUPS = tuple(GROUP_MEMBERS)
SUPPORTED_TARGETS = tuple(m for members in GROUP_MEMBERS.values() for m in members)
_PATH = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


@dataclass(frozen=True)
class SlotEntry:
    """What the engine keeps about one loaded adapter besides its weights."""

    name: str
    slot: int
    r_max: int
    train_ranks: tuple[int, ...]
    scaling: str
    alpha: float
    path: str
    manifest: object  # the core's AdapterManifest
    rank_scales: tuple[tuple[int, float], ...] = ()  # the manifest's fitted (rank, c_rank) pairs

    def scale(self, rank: int) -> float:
        """alpha * s_rank * c_rank, the factor of the rank-r delta (adapters.p.served_scale)."""
        from matryoshka_lora.adapters.p import served_scale

        return served_scale(rank, self.scaling, self.alpha, dict(self.rank_scales))


def member_columns(spec: ModelSpec, group: str) -> dict[str, tuple[int, int]]:
    """Output column range of each member inside the fused group's output."""
    out, start = {}, 0
    for member in GROUP_MEMBERS[group]:
        width = spec.module_shape(member)[1]
        out[member], start = (start, start + width), start + width
    return out


def fuse_group(
    spec: ModelSpec, group: str, members: dict[str, tuple[torch.Tensor, torch.Tensor]], r_max: int
) -> FusedLoRA:
    """Interleave the present members' A columns; keep each member's B with its output columns (see FusedLoRA)."""
    present = [m for m in GROUP_MEMBERS[group] if m in members]
    k = len(present)
    cols = member_columns(spec, group)
    lora_A = torch.empty(spec.module_shape(present[0])[0], k * r_max)
    lora_B = []
    for m, name in enumerate(present):
        a, b = members[name]
        lora_A[:, m::k] = a
        lora_B.append((b.contiguous(), *cols[name]))
    return FusedLoRA(lora_A, tuple(lora_B))


def rounded_to_bf16(weights: dict) -> dict:
    """Module path -> (A, B), every weight rounded to the nearest bfloat16 value (kept as float32 tensors):
    EngineConfig.adapter_dtype "bfloat16", which the C kernels then store in bfloat16 panels."""
    return {path: (a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()) for path, (a, b) in weights.items()}


def fuse_adapter(spec: ModelSpec, weights: dict, r_max: int, pack_lora: Callable) -> list[dict]:
    """Module path -> (A, B) dict of the core's Adapter -> per layer {group: pack_lora(FusedLoRA)}, in the
    layout of the op set whose `pack_lora` is given: each group packed as soon as it is fused, so that the
    fused copy never exists for more than one group."""
    per_layer: list[dict[str, dict]] = [{} for _ in range(spec.num_layers)]
    for path, (lora_A, lora_B) in weights.items():
        match = _PATH.search(path)
        if match is None or match.group(2) not in SUPPORTED_TARGETS:
            raise ConfigError(
                "adapter target module", path, f"layers.N.(self_attn|mlp).{{{','.join(SUPPORTED_TARGETS)}}}"
            )
        layer, name = int(match.group(1)), match.group(2)
        if layer >= spec.num_layers:
            raise AdapterFormatError(f"adapter module {path!r}: layer {layer} >= the model's {spec.num_layers} layers")
        in_f, out_f = spec.module_shape(name)
        if tuple(lora_A.shape) != (in_f, r_max) or tuple(lora_B.shape) != (r_max, out_f):
            raise AdapterFormatError(
                f"adapter module {path!r}: got A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}; "
                f"the model needs A ({in_f}, {r_max}), B ({r_max}, {out_f})"
            )
        group = next(g for g, ms in GROUP_MEMBERS.items() if name in ms)
        per_layer[layer].setdefault(group, {})[name] = (lora_A.float(), lora_B.float())
    return [{g: pack_lora(fuse_group(spec, g, members, r_max)) for g, members in layer.items()} for layer in per_layer]


class AdapterSlots:
    """Slot table of loaded adapters. Mutated only by the engine thread (install/remove)."""

    def __init__(self, spec: ModelSpec, max_adapters: int):
        self.spec, self.max_adapters = spec, max_adapters
        self.table: list[dict[str, list]] = [  # [layer][group][slot]: a packed adapter group or None
            {g: [None] * max_adapters for g in GROUPS} for _ in range(spec.num_layers)
        ]
        self.entries: dict[str, SlotEntry] = {}
        self._free = list(range(max_adapters))

    def names(self) -> list[str]:
        return sorted(self.entries)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def get(self, name: str) -> SlotEntry | None:
        return self.entries.get(name)

    def install(self, name: str, manifest, path: str, fused: list[dict]) -> SlotEntry:
        """Put packed weights (from fuse_adapter) into the lowest free slot under `name`.

        `manifest` is the core's AdapterManifest (or anything with r_max, train_ranks, scaling, alpha and
        optionally rank_scales)."""
        if name in self.entries:
            raise ConfigError("adapter name to install", name, "a name not loaded (unregister the old one first)")
        if not self._free:
            raise ConfigError(
                "number of loaded adapters", self.max_adapters + 1, f"at most max_adapters={self.max_adapters}"
            )
        slot = heapq.heappop(self._free)
        m = manifest
        scales = tuple((int(r), float(c)) for r, c in (getattr(m, "rank_scales", None) or {}).items())
        entry = SlotEntry(
            name, slot, int(m.r_max), tuple(m.train_ranks), m.scaling, float(m.alpha), str(path), m, scales
        )
        for layer, groups in zip(self.table, fused):
            for group in GROUPS:
                layer[group][slot] = groups.get(group)
        self.entries[name] = entry
        log.info("adapter %r in slot %d (r_max %d, scaling %s)", name, slot, entry.r_max, entry.scaling)
        return entry

    def unregister(self, name: str) -> SlotEntry:
        """Forget the name (new requests can no longer use it); its slot stays until `free_slot`."""
        return self.entries.pop(name)

    def free_slot(self, slot: int) -> None:
        """Drop the weights of a slot no sequence uses any more and make it available."""
        for layer in self.table:
            for group in GROUPS:
                layer[group][slot] = None
        heapq.heappush(self._free, slot)
        log.info("adapter slot %d freed", slot)


def random_fused_adapter(spec: ModelSpec, r_max: int, pack_lora: Callable, seed: int = 0) -> list[dict]:
    """Random weights on every target at r_max, fused and packed as fuse_adapter does (for warm-up timing only)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(spec.num_layers):
        layer = {}
        for group, members in GROUP_MEMBERS.items():
            weights = {}
            for m in members:
                i, o = spec.module_shape(m)
                weights[m] = (
                    torch.randn(i, r_max, generator=gen) * i**-0.5,
                    torch.randn(r_max, o, generator=gen) * 1e-3,
                )
            layer[group] = pack_lora(fuse_group(spec, group, weights, r_max))
        out.append(layer)
    return out


WARMUP_ADAPTER, WARMUP_TWIN = "__warmup__", "__warmup_twin__"
DEFAULT_WARMUP_R_MAX = 64


def install_warmup_adapters(adapters: AdapterSlots, spec: ModelSpec, pack_lora: Callable):
    """(entries to time, entries installed here) for the warm-up's rank costs.

    The largest loaded adapter is timed (so the fit sees the modules it really targets), else a
    temporary random one at r_max 64 on every module. Its weights also go in a second, temporary slot
    (shared, not copied) so that steps with two adapters' groups are timed too."""
    loaded = sorted(adapters.entries.values(), key=lambda e: e.r_max)
    installed = []
    if loaded:
        entry = loaded[-1]
    else:
        manifest = SimpleNamespace(
            r_max=DEFAULT_WARMUP_R_MAX, train_ranks=(DEFAULT_WARMUP_R_MAX,), scaling="none", alpha=1.0
        )
        entry = adapters.install(
            WARMUP_ADAPTER, manifest, "", random_fused_adapter(spec, DEFAULT_WARMUP_R_MAX, pack_lora)
        )
        installed.append(entry)
    entries = [entry]
    if adapters.num_free_slots > 0:
        weights = [
            {g: layer[g][entry.slot] for g in layer if layer[g][entry.slot] is not None} for layer in adapters.table
        ]
        twin = adapters.install(WARMUP_TWIN, entry.manifest, "", weights)
        entries.append(twin)
        installed.append(twin)
    return entries, installed
