"""Fit the per-rank serving scale c_r of an adapter on a task's dev split, by loss.

    batch  = the first `num_dev` dev examples (teacher-forced, loss on the answer tokens only)
    for r in ranks:
        c_r = argmin over c in candidates of  loss(model with the rank-r slice served at alpha * s_r * c)
    manifest.rank_scales = {r: c_r}                  # served by the engine, the vLLM export and PEFT export

A truncated slice misses part of the trained update; a scale c_r > 1 can make up for the missing
energy, c_r < 1 can temper a slice that overshoots. c_r = 1 stays unless another candidate's loss is
lower by more than `min_gain` (relative), so a flat loss does not move the scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from matryoshka_lora.adapters import inject, store
from matryoshka_lora.errors import ConfigError
from matryoshka_lora.models import load_base_model
from matryoshka_lora.training import data, tasks

log = logging.getLogger(__name__)

CANDIDATES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


@dataclass
class FitConfig:
    adapter: Path
    task: str
    ranks: tuple[int, ...] | None = None  # None = the adapter's train ranks
    candidates: tuple[float, ...] = CANDIDATES
    num_dev: int = 200
    batch_size: int = 50
    min_gain: float = 0.005
    model: str | None = None

    def validate(self) -> FitConfig:
        tasks.get_task(self.task)
        if not self.candidates or any(not c > 0 for c in self.candidates) or 1.0 not in self.candidates:
            raise ConfigError("candidates", self.candidates, "scales > 0, including 1.0")
        if self.num_dev < 1 or self.batch_size < 1 or self.min_gain < 0:
            raise ConfigError(
                "num_dev/batch_size/min_gain", (self.num_dev, self.batch_size, self.min_gain), ">= 1, >= 1, >= 0"
            )
        self.adapter = Path(self.adapter)
        return self


def dev_batches(tokenizer, task: str, num_dev: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    records = data.records_from_examples(tasks.task_examples(task, "dev", num_dev))
    return [
        data.collate_records(tokenizer, records[i : i + batch_size], 1024) for i in range(0, len(records), batch_size)
    ]


@torch.no_grad()
def mean_loss(model, batches) -> float:
    """Token-weighted mean loss over the answer tokens of every batch."""
    total, count = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / count


def fit_rank_scales(cfg: FitConfig) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The fitted {rank: c_r} and every measured loss {rank: {c: loss}} (module docstring)."""
    cfg.validate()
    adapter = store.load_adapter(cfg.adapter)
    model, tokenizer = load_base_model(cfg.model)
    layers = store.attach_adapter(model, adapter).values()
    for layer in layers:
        layer.rank_scales = {}  # fit from c = 1, not on top of an earlier fit
    batches = dev_batches(tokenizer, cfg.task, cfg.num_dev, cfg.batch_size)
    ranks = cfg.ranks or adapter.manifest.train_ranks
    fitted, losses = {}, {}
    for rank in ranks:
        inject.set_inference_ranks(model, rank)
        measured = {}
        for c in cfg.candidates:
            for layer in layers:
                layer.rank_scales = {rank: float(c)}
            measured[c] = mean_loss(model, batches)
        best = min(measured, key=measured.get)
        keep_one = measured[best] > measured[1.0] * (1 - cfg.min_gain)
        fitted[str(rank)] = 1.0 if keep_one else float(best)
        losses[str(rank)] = {f"{c:g}": round(v, 5) for c, v in measured.items()}
        log.info(
            "rank %d: c = %g (loss %.4f at c = 1, %.4f at c = %g)",
            rank,
            fitted[str(rank)],
            measured[1.0],
            measured[best],
            best,
        )
    return fitted, losses


def write_rank_scales(path: Path, scales: dict[str, float]) -> store.AdapterManifest:
    """Store the scales in the adapter's manifest (atomically); c_r = 1 entries are left out."""
    kept = {r: c for r, c in scales.items() if c != 1.0}
    return store.update_manifest(path, rank_scales=kept or None)
