"""Rank-sweep evaluation: accuracy of one or more adapters at every rank in a list, plus the base model.

    for each adapter:  attach it once (weights at r_max), then for r in ranks:
        set_inference_ranks(model, r)                      # the first r columns of A / rows of B
        completions = greedy batched generate (left padding, chat template)
        accuracy[r] = mean(tasks.score(task, completion, answer))
    aurac_log2 / aurac_linear = metrics.aurac(ranks, accuracy)   # over ranks >= 1
    base_accuracy = the same on the model without adapter (rank 0)

The result is a JSON-able dict; each adapter's numbers are also stored in its manifest
(`store.update_eval_results`), which the server shows.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from matryoshka_lora.adapters import inject, store
from matryoshka_lora.engine.config import WEIGHT_FORMATS
from matryoshka_lora.errors import ConfigError
from matryoshka_lora.metrics import aurac
from matryoshka_lora.models import load_base_model, model_id
from matryoshka_lora.training import data, tasks

log = logging.getLogger(__name__)


BACKENDS = ("engine", "hf")


@dataclass
class EvalConfig:
    adapters: tuple[Path, ...]
    task: str
    ranks: tuple[int, ...] | None = None  # None = each adapter's train ranks
    num_test: int = 200
    split: str = "test"  # "dev" picks hyper-parameters; only test results are stored in manifests
    batch_size: int = 50  # the hf backend's generate batch
    max_num_seqs: int = 64  # the engine backend's sequences at once (1: every decode step one user's)
    max_new_tokens: int | None = None  # None = the task's default
    model: str | None = None
    update_manifests: bool = True
    backend: str = "engine"  # "engine": the serving engine, all ranks in one batch; "hf": model.generate per rank
    weight_format: str = "auto"  # the engine backend's base weights (EngineConfig.weight_format)

    def validate(self) -> EvalConfig:
        tasks.get_task(self.task)
        if self.split not in ("dev", "test"):
            raise ConfigError("eval split", self.split, ["dev", "test"])
        if not self.adapters:
            raise ConfigError("adapters", [], "at least one adapter directory")
        for name in ("num_test", "batch_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), ">= 1")
        if self.ranks is not None and (not self.ranks or min(self.ranks) < 0):
            raise ConfigError("ranks", self.ranks, "a non-empty list of ranks >= 0 (0 = base model)")
        if self.backend not in BACKENDS:
            raise ConfigError("eval backend", self.backend, list(BACKENDS))
        if self.weight_format not in WEIGHT_FORMATS:
            raise ConfigError("eval weight_format", self.weight_format, list(WEIGHT_FORMATS))
        self.adapters = tuple(Path(a) for a in self.adapters)
        return self


@torch.inference_mode()
def generate_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of user prompts (chat template), batched with left padding; special tokens dropped."""
    out, side = [], tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [
                data.render_prompt(tokenizer, data.prompt_messages(p)) for p in prompts[start : start + batch_size]
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            generated = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            out += tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def accuracy(task: tasks.Task, completions: list[str], examples: list[tasks.Example]) -> float:
    return sum(tasks.score(task, c, ex.answer) for c, ex in zip(completions, examples, strict=True)) / len(examples)


def rank_sweep(
    model, tokenizer, task: tasks.Task, examples, ranks, batch_size: int, max_new_tokens: int
) -> dict[int, float]:
    """Accuracy at each rank of the adapter attached to `model` (rank 0 = base alone)."""
    prompts = [ex.prompt for ex in examples]
    results = {}
    for rank in ranks:
        started = time.perf_counter()
        inject.set_inference_ranks(model, rank)
        results[rank] = accuracy(
            task, generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size), examples
        )
        log.info("rank %d: accuracy %.3f (%.1f s)", rank, results[rank], time.perf_counter() - started)
    return results


def binomial_stderr(accuracy: float, num: int) -> float:
    """The standard error of an accuracy measured on `num` independent examples: sqrt(p (1 - p) / n)."""
    return math.sqrt(accuracy * (1 - accuracy) / num) if num else 0.0


def summarize(
    name: str, path: Path, manifest: store.AdapterManifest, accs: dict[int, float], num_test: int = 0
) -> dict:
    """One adapter's entry: per-rank accuracy and its binomial standard error (string keys, JSON-style),
    and AURAC over the ranks >= 1."""
    ranks = sorted(r for r in accs if r >= 1)
    curve = [accs[r] for r in ranks]
    return {
        "name": name,
        "path": str(path),
        "method": manifest.method,
        "r_max": manifest.r_max,
        "ranks": ranks,
        "accuracy": {str(r): accs[r] for r in ranks},
        "stderr": {str(r): round(binomial_stderr(accs[r], num_test), 5) for r in ranks},
        "aurac_log2": aurac(ranks, curve, axis="log2"),
        "aurac_linear": aurac(ranks, curve, axis="linear"),
    }


def sweep_ranks(cfg_ranks: tuple[int, ...] | None, manifest: store.AdapterManifest) -> list[int]:
    """The ranks to evaluate an adapter at: the asked ones it offers (1..r_max), else its train ranks."""
    if cfg_ranks is None:
        return list(manifest.train_ranks)
    ranks = sorted({r for r in cfg_ranks if 1 <= r <= manifest.r_max})
    dropped = sorted({r for r in cfg_ranks if r > manifest.r_max})
    if dropped:
        log.warning("adapter %s has r_max=%d: ranks %s not evaluated", manifest.name, manifest.r_max, dropped)
    return ranks


def evaluate(cfg: EvalConfig) -> dict:
    """Evaluate every adapter of `cfg` on its task; returns the result dict (see module doc)."""
    cfg.validate()
    task = tasks.get_task(cfg.task)
    examples = tasks.task_examples(cfg.task, cfg.split, cfg.num_test)
    max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
    started = time.perf_counter()
    model, tokenizer = load_base_model(cfg.model)
    if cfg.backend == "engine":
        from matryoshka_lora.training import engine_eval

        engine = engine_eval.eval_engine(
            model, tokenizer, cfg.model, max_num_seqs=cfg.max_num_seqs, weight_format=cfg.weight_format
        )
        weight_format = engine.weight_format
        log.info("eval engine: base weights as %s", weight_format)

        def sweep(path, ranks):
            name = None if path is None else engine.load_adapter(str(path)).name
            accs = engine_eval.engine_rank_sweep(engine, name, task, examples, ranks, max_new_tokens)
            if name is not None:
                engine.unload_adapter(name)
            return accs
    else:
        attached, weight_format = False, "float32"

        def sweep(path, ranks):
            nonlocal model, tokenizer, attached
            if path is not None:
                if attached:  # a fresh base model for each further adapter
                    model, tokenizer = load_base_model(cfg.model)
                store.attach_adapter(model, store.load_adapter(path))
                attached = True
            return rank_sweep(model, tokenizer, task, examples, ranks, cfg.batch_size, max_new_tokens)

    base = sweep(None, [0])[0]
    result = {
        "task": cfg.task,
        "split": cfg.split,
        "num_test": len(examples),
        "base_model": model_id(model),
        "base_accuracy": base,
        "backend": cfg.backend,
        "weight_format": weight_format,
        "max_num_seqs": cfg.max_num_seqs if cfg.backend == "engine" else None,
        "adapters": [],
    }
    for path in cfg.adapters:
        manifest = store.read_manifest(path)
        log.info("evaluating %s (%s, r_max=%d) on %s", manifest.name, manifest.method, manifest.r_max, cfg.task)
        accs = sweep(path, sweep_ranks(cfg.ranks, manifest))
        entry = summarize(manifest.name, path, manifest, accs, len(examples))
        result["adapters"].append(entry)
        if cfg.update_manifests and cfg.split == "test":
            store.update_eval_results(path, manifest_results(result, entry))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def manifest_results(result: dict, entry: dict) -> dict:
    keys = ("accuracy", "stderr", "aurac_log2", "aurac_linear")
    return {
        "task": result["task"],
        "num_test": result["num_test"],
        "base_accuracy": result["base_accuracy"],
        **{k: entry[k] for k in keys},
    }


def format_table(result: dict) -> str:
    """A plain-text table: one row per adapter, accuracy (%) per rank, AURAC (log2, linear)."""
    ranks = sorted({r for entry in result["adapters"] for r in entry["ranks"]})
    header = ["adapter", "method", "base"] + [f"r{r}" for r in ranks] + ["AURAC-log2", "AURAC-lin"]
    rows = []
    for entry in result["adapters"]:
        cells = [f"{100 * entry['accuracy'][str(r)]:.1f}" if str(r) in entry["accuracy"] else "-" for r in ranks]
        rows.append(
            [
                entry["name"],
                entry["method"],
                f"{100 * result['base_accuracy']:.1f}",
                *cells,
                f"{100 * entry['aurac_log2']:.1f}",
                f"{100 * entry['aurac_linear']:.1f}",
            ]
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)


def write_result(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
