"""Train a LoRA / DyLoRA / Matryoshka adapter with the Hugging Face Trainer.

The three methods differ ONLY in the fixed diagonal p between the factors (`adapters.build_p`):

    lora:        p = build_p("lora", ...)                 set once; every rank gets the r_max update
    matryoshka:  p = build_p("matryoshka", ...)           set once; ONE forward pass per step
    dylora:      each optimizer step: b = sample_dylora_rank(S, Generator(seed, step))
                 p = build_p("dylora", ..., sampled_rank=b)

The Trainer brings multi-GPU (`torchrun` / `accelerate launch`), bf16 autocast on CUDA devices that
support it (fp32 elsewhere), the progress bar, and resumable checkpoints (optimizer, scheduler,
RNG, step). Every checkpoint, and the final output, is a directory in the adapter format
(`manifest.json` + `adapter.safetensors`), so any checkpoint can be evaluated or served as is.
The DyLoRA rank depends only on (seed, step), so a resumed run samples the same ranks.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from matryoshka_lora.adapters import inject, p as p_mod, store
from matryoshka_lora.errors import ConfigError
from matryoshka_lora.models import load_base_model, model_fingerprint, model_id
from matryoshka_lora.training import data, tasks

log = logging.getLogger(__name__)

METHODS = ("lora", "dylora", "matryoshka")
SCALINGS = ("none", "rank", "sqrt")


@dataclass
class TrainConfig:
    """Everything a training run needs; `validate()` checks it once, where it enters."""

    out: Path
    method: str = "matryoshka"
    r_max: int = 32
    train_ranks: tuple[int, ...] | None = None  # None = powers of two up to r_max
    scaling: str = "none"
    alpha: float = 1.0
    target_modules: tuple[str, ...] = inject.DEFAULT_TARGET_MODULES
    lr: float = 1e-3
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    max_seq_len: int = 64
    warmup_ratio: float = 0.05
    seed: int = 0
    save_every: int | None = None  # optimizer steps between checkpoints
    resume: bool = False
    task: str | None = None
    num_train: int = 4000  # examples drawn from a built-in task
    data: Path | None = None
    model: str | None = None  # None = the embedded default model
    name: str | None = None  # adapter name; default: the output directory's name
    logging_steps: int = 10
    command: str = field(default_factory=lambda: shlex.join(["matryoshka-lora", *sys.argv[1:]]))  # for the notes

    def validate(self) -> TrainConfig:
        if self.method not in METHODS:
            raise ConfigError("method", self.method, list(METHODS))
        if self.scaling not in SCALINGS:
            raise ConfigError("scaling", self.scaling, list(SCALINGS))
        if (self.task is None) == (self.data is None):
            raise ConfigError("data source", {"task": self.task, "data": self.data}, "exactly one of --task / --data")
        if self.task is not None:
            tasks.get_task(self.task)
        for name in ("r_max", "batch_size", "grad_accum", "max_seq_len", "num_train", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), ">= 1")
        for name in ("max_steps", "save_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), ">= 1 (or unset)")
        if not (self.lr > 0 and self.epochs > 0 and self.alpha > 0 and 0 <= self.warmup_ratio < 1):
            raise ConfigError("lr/epochs/alpha/warmup_ratio", (self.lr, self.epochs, self.alpha, self.warmup_ratio), "lr, epochs, alpha > 0; 0 <= warmup_ratio < 1")
        ranks = p_mod.default_train_ranks(self.r_max) if self.train_ranks is None else self.train_ranks
        self.train_ranks = p_mod.normalize_train_ranks(ranks, self.r_max)
        self.target_modules = tuple(self.target_modules)
        self.out = Path(self.out)
        return self


def checkpoint_dir(out: Path) -> Path:
    """Checkpoints live beside the adapter (`<out>-checkpoints/checkpoint-<step>/`), never inside it."""
    return out.with_name(out.name + "-checkpoints")


def dylora_rank(train_ranks: tuple[int, ...], seed: int, step: int) -> int:
    """The DyLoRA rank of optimizer step `step`: a pure function of (seed, step), so resuming repeats it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return p_mod.sample_dylora_rank(train_ranks, generator)


class DyLoRACallback(TrainerCallback):
    """Before each optimizer step, sample b and set p = build_p("dylora", ..., sampled_rank=b)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.sampled_ranks: list[int] = []  # (for tests and logs) b of each step this process ran

    def on_step_begin(self, args, state, control, **kwargs):
        b = dylora_rank(self.cfg.train_ranks, self.cfg.seed, state.global_step)
        p = p_mod.build_p("dylora", self.cfg.r_max, self.cfg.train_ranks, self.cfg.scaling, sampled_rank=b)
        inject.set_p(self.model, p)
        self.sampled_ranks.append(b)


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints hold only the adapter, in the adapter format (not the 135M base)."""

    def __init__(self, *args, manifest: store.AdapterManifest, **kwargs):
        super().__init__(*args, **kwargs)
        self.manifest = manifest

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            save_model_adapter(self.accelerator.unwrap_model(self.model), self.manifest, Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        adapter = store.load_adapter(resume_from_checkpoint)
        inject.load_lora_state_dict(model or self.model, adapter_tensors(adapter))


def adapter_tensors(adapter: store.Adapter) -> dict[str, torch.Tensor]:
    out = {}
    for path, (lora_A, lora_B) in adapter.weights.items():
        out[f"{path}.lora_A"], out[f"{path}.lora_B"] = lora_A, lora_B
    return out


def save_model_adapter(model: torch.nn.Module, manifest: store.AdapterManifest, out_dir: Path) -> None:
    """Write the model's LoRA weights (float32 CPU copies) with `manifest` to `out_dir` in the adapter format."""
    store.save_adapter(out_dir, manifest, store.adapter_from_model(model, manifest).weights)


def load_training_data(cfg: TrainConfig, tokenizer) -> data.SFTDataset:
    if cfg.task is not None:
        records = data.records_from_examples(tasks.task_examples(cfg.task, "train", cfg.num_train, seed=cfg.seed))
    else:
        records = data.read_jsonl(cfg.data)
    tokenized, report = data.tokenize_records(tokenizer, records, cfg.max_seq_len)
    log.info("training data: %d records, %d kept, %d skipped as too long", report.num_records, report.num_kept, report.num_too_long)
    return data.SFTDataset(tokenized)


def training_arguments(cfg: TrainConfig, run_dir: Path) -> TrainingArguments:
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=0.0,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )


def build_manifest(cfg: TrainConfig, base_id: str, fingerprint: str) -> store.AdapterManifest:
    return store.AdapterManifest(
        name=cfg.name or cfg.out.name,
        base_model=base_id,
        base_fingerprint=fingerprint,
        target_modules=cfg.target_modules,
        r_max=cfg.r_max,
        train_ranks=cfg.train_ranks,
        scaling=cfg.scaling,
        method=cfg.method,
        alpha=cfg.alpha,
        notes=f"retrain: {cfg.command}",
    )


def build_trainer(cfg: TrainConfig, callbacks: list[TrainerCallback] = ()) -> AdapterTrainer:
    """Load the base model, inject LoRA, set p (or the DyLoRA callback), and make the Trainer."""
    cfg.validate()
    model, tokenizer = load_base_model(cfg.model)
    base_id, fingerprint = model_id(model), model_fingerprint(model)  # before injection renames weights
    inject.inject_lora(model, cfg.r_max, cfg.scaling, cfg.target_modules, cfg.alpha, seed=cfg.seed)
    model.config.use_cache = False
    model.train()
    all_callbacks = list(callbacks)
    if cfg.method == "dylora":
        all_callbacks.insert(0, DyLoRACallback(model, cfg))
    else:
        inject.set_p(model, p_mod.build_p(cfg.method, cfg.r_max, cfg.train_ranks, cfg.scaling))
    dataset = load_training_data(cfg, tokenizer)
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s r_max=%d ranks=%s scaling=%s: %d trainable parameters, %d examples",
             cfg.method, cfg.r_max, list(cfg.train_ranks), cfg.scaling, num_trainable, len(dataset))
    return AdapterTrainer(
        model=model,
        args=training_arguments(cfg, checkpoint_dir(cfg.out)),
        train_dataset=dataset,
        data_collator=data.PadCollator(tokenizer.pad_token_id),
        callbacks=all_callbacks,
        manifest=build_manifest(cfg, base_id, fingerprint),
    )


def train(cfg: TrainConfig, callbacks: list[TrainerCallback] = ()) -> Path:
    """Train and write the adapter to `cfg.out`; returns that path. `cfg.resume` continues from the
    last checkpoint under `<out>-checkpoints/` (a fresh start, with a warning, if there is none)."""
    trainer = build_trainer(cfg, callbacks)
    checkpoint = None
    if cfg.resume:
        run_dir = checkpoint_dir(cfg.out)
        checkpoint = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
        if checkpoint is None:
            log.warning("--resume: no checkpoint under %s, starting from step 0", run_dir)
        else:
            log.info("resuming from %s", checkpoint)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    wall_s = time.perf_counter() - started
    manifest = trainer.manifest
    manifest.notes = f"{manifest.notes}; {trainer.state.global_step} steps, mean train loss {result.training_loss:.4f}, {wall_s:.0f} s"
    if trainer.args.should_save:
        save_model_adapter(trainer.model, manifest, cfg.out)
        log.info("adapter written to %s (%d steps, %.0f s, mean loss %.4f)", cfg.out, trainer.state.global_step, wall_s, result.training_loss)
    return cfg.out
