"""Train a LoRA / DyLoRA / Matryoshka adapter with the Hugging Face Trainer.

The three methods differ ONLY in the fixed diagonal p between the factors (`adapters.build_p`):

    lora:        p = build_p("lora", ...)                 set once; every rank gets the r_max update
    matryoshka:  p = build_p("matryoshka", ...)           set once; ONE forward pass per step
    dylora:      each optimizer step: b = sample_dylora_rank(S, Generator(seed, step))
                 p = build_p("dylora", ..., sampled_rank=b)

Two options act on top of any method:

    slice_loss k > 0:   loss = loss_p + mean over k ranks b drawn from S \ {r_max} (seeded by step) of
                        loss at rank b as served (x A[:, :b] B[:b] * alpha s_b, no p): every slice is
                        also trained to stand alone; k + 1 forward passes per step
    nest (default):     after training, write the adapter nested by SVD with the training diagonal folded
                        in (`adapters.nest`) to `out`, and the raw one to `<out>-raw`: every rank-k slice
                        is then the best rank-k approximation of the trained update

`rank_loss_every` n: every n steps, the loss of the fixed dev batch at every train rank as served is
logged and appended to `<out>-checkpoints/rank_losses.jsonl`, so each slice's learning curve is kept.

The Trainer brings multi-GPU (`torchrun` / `accelerate launch`), bf16 autocast on CUDA devices that
support it (fp32 elsewhere), the progress bar, and resumable checkpoints (optimizer, scheduler,
RNG, step). Every checkpoint, and the final output, is a directory in the adapter format
(`manifest.json` + `adapter.safetensors`), so any checkpoint can be evaluated or served as is.
The DyLoRA rank depends only on (seed, step), so a resumed run samples the same ranks.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from matryoshka_lora.adapters import inject, store
from matryoshka_lora.adapters import p as p_mod
from matryoshka_lora.errors import ConfigError
from matryoshka_lora.models import load_base_model, model_fingerprint, model_id
from matryoshka_lora.training import data, tasks

log = logging.getLogger(__name__)

METHODS = p_mod.METHODS
SCALINGS = p_mod.SCALINGS


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
    slice_loss: int = 0  # extra served-rank losses per step (module docstring)
    nest: bool = True  # write the SVD-nested adapter to `out` (the raw one to <out>-raw); docs/results.md
    rank_loss_every: int | None = None  # steps between per-rank dev losses; None = off
    num_rank_loss: int = 64  # dev examples in the per-rank loss batch
    bf16: bool | None = None  # None: on where supported (CUDA bf16, or a CPU with AVX512-BF16)
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
        if not isinstance(self.slice_loss, int) or self.slice_loss < 0:
            raise ConfigError("slice_loss", self.slice_loss, "an integer >= 0")
        if self.num_rank_loss < 1:
            raise ConfigError("num_rank_loss", self.num_rank_loss, ">= 1")
        for name in ("max_steps", "save_every", "rank_loss_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), ">= 1 (or unset)")
        if not (self.lr > 0 and self.epochs > 0 and self.alpha > 0 and 0 <= self.warmup_ratio < 1):
            raise ConfigError(
                "lr/epochs/alpha/warmup_ratio",
                (self.lr, self.epochs, self.alpha, self.warmup_ratio),
                "lr, epochs, alpha > 0; 0 <= warmup_ratio < 1",
            )
        ranks = p_mod.default_train_ranks(self.r_max) if self.train_ranks is None else self.train_ranks
        self.train_ranks = p_mod.normalize_train_ranks(ranks, self.r_max)
        if self.slice_loss and len(self.train_ranks) < 2 and self.train_ranks[-1] == self.r_max:
            raise ConfigError("slice_loss", self.slice_loss, "0 when the only train rank is r_max")
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


def slice_ranks(train_ranks: tuple[int, ...], r_max: int, k: int, seed: int, step: int) -> list[int]:
    """The k served ranks whose losses step `step` adds: drawn from S without r_max, a function of (seed, step)."""
    pool = [r for r in train_ranks if r < r_max]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
    return [int(pool[i]) for i in torch.randint(len(pool), (k,), generator=generator).tolist()]


def cpu_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.bf16 is not None:
        return cfg.bf16
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_bf16_supported()


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints hold only the adapter, in the adapter format (not the 135M base),
    and whose loss adds `slice_loss` served-rank losses (module docstring)."""

    def __init__(self, *args, manifest: store.AdapterManifest, cfg: TrainConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.manifest, self.cfg = manifest, cfg

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        cfg = self.cfg
        if cfg is None or not cfg.slice_loss or not model.training:
            return out
        loss = out[0] if return_outputs else out
        inner = self.accelerator.unwrap_model(model)
        ranks = slice_ranks(cfg.train_ranks, cfg.r_max, cfg.slice_loss, cfg.seed, self.state.global_step)
        try:
            for rank in ranks:
                inject.set_inference_ranks(inner, rank)
                loss = loss + super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch) / len(ranks)
        finally:
            inject.set_inference_ranks(inner, None)
        return (loss, out[1]) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            save_model_adapter(
                self.accelerator.unwrap_model(self.model), self.manifest, Path(output_dir or self.args.output_dir)
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        adapter = store.load_adapter(resume_from_checkpoint)
        inject.load_lora_state_dict(model or self.model, adapter_tensors(adapter))


class RankLossCallback(TrainerCallback):
    """Every `every` steps (and at the end): the dev batch's loss at each train rank as served, logged and
    appended as one JSON line {"step", "loss": {rank: loss}} to `file`."""

    def __init__(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        ranks: tuple[int, ...],
        every: int,
        file: Path,
        bf16: bool,
    ):
        self.model, self.batch, self.ranks, self.every, self.file, self.bf16 = model, batch, ranks, every, file, bf16
        self.history: list[dict] = []

    @torch.no_grad()
    def measure(self, step: int) -> dict:
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.batch.items()}
        losses = {}
        try:
            for rank in self.ranks:
                inject.set_inference_ranks(self.model, rank)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    losses[str(rank)] = round(float(self.model(**batch).loss), 5)
        finally:
            inject.set_inference_ranks(self.model, None)
            self.model.train(was_training)
        row = {"step": step, "loss": losses}
        self.history.append(row)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with self.file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        log.info("dev loss per rank at step %d: %s", step, losses)
        return row

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and args.should_save:
            self.measure(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save and (not self.history or self.history[-1]["step"] != state.global_step):
            self.measure(state.global_step)


def rank_loss_batch(cfg: TrainConfig, tokenizer) -> dict[str, torch.Tensor]:
    """The fixed per-rank loss batch: the first `num_rank_loss` dev examples of the task (or data records)."""
    if cfg.task is not None:
        records = data.records_from_examples(tasks.task_examples(cfg.task, "dev", cfg.num_rank_loss))
    else:
        records = data.read_jsonl(cfg.data)[: cfg.num_rank_loss]
    return data.collate_records(tokenizer, records, cfg.max_seq_len)


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
    log.info(
        "training data: %d records, %d kept, %d skipped as too long",
        report.num_records,
        report.num_kept,
        report.num_too_long,
    )
    return data.SFTDataset(tokenized)


def training_arguments(cfg: TrainConfig, run_dir: Path) -> TrainingArguments:
    bf16 = use_bf16(cfg)
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
    if cfg.rank_loss_every:
        file = checkpoint_dir(cfg.out) / "rank_losses.jsonl"
        all_callbacks.append(
            RankLossCallback(
                model, rank_loss_batch(cfg, tokenizer), cfg.train_ranks, cfg.rank_loss_every, file, use_bf16(cfg)
            )
        )
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(
        "%s r_max=%d ranks=%s scaling=%s: %d trainable parameters, %d examples",
        cfg.method,
        cfg.r_max,
        list(cfg.train_ranks),
        cfg.scaling,
        num_trainable,
        len(dataset),
    )
    return AdapterTrainer(
        model=model,
        args=training_arguments(cfg, checkpoint_dir(cfg.out)),
        train_dataset=dataset,
        data_collator=data.PadCollator(tokenizer.pad_token_id),
        callbacks=all_callbacks,
        manifest=build_manifest(cfg, base_id, fingerprint),
        cfg=cfg,
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
        raw_out = cfg.out.with_name(cfg.out.name + "-raw") if cfg.nest else cfg.out
        if cfg.nest:
            manifest.name = f"{manifest.name[:60]}-raw"
        save_model_adapter(trainer.model, manifest, raw_out)
        log.info(
            "adapter written to %s (%d steps, %.0f s, mean loss %.4f)",
            raw_out,
            trainer.state.global_step,
            wall_s,
            result.training_loss,
        )
        if cfg.nest:
            from matryoshka_lora.adapters.nest import nest_adapter

            nested = nest_adapter(store.load_adapter(raw_out), name=cfg.name or cfg.out.name)
            store.save_adapter(cfg.out, nested.manifest, nested.weights)
            log.info("nested adapter written to %s", cfg.out)
    return cfg.out
