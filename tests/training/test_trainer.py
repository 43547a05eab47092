"""Training on the tiny random Llama: p decides which columns learn; an interrupted run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from matryoshka_lora.adapters import inject, store
from matryoshka_lora.adapters.p import METHODS
from matryoshka_lora.errors import ConfigError
from matryoshka_lora.training.trainer import (
    DyLoRACallback,
    TrainConfig,
    build_trainer,
    checkpoint_dir,
    dylora_rank,
    slice_ranks,
    train,
)

R_MAX, TRAIN_RANKS = 8, (1, 2, 4)


def tiny_config(model_dir, out, **overrides) -> TrainConfig:
    values = dict(
        out=out,
        model=str(model_dir),
        task="reverse",
        num_train=24,
        batch_size=4,
        r_max=R_MAX,
        train_ranks=TRAIN_RANKS,
        max_steps=3,
        lr=1e-2,
        warmup_ratio=0.0,
        max_seq_len=64,
        logging_steps=1,
        seed=3,
    )
    values.update(overrides)
    return TrainConfig(**values)


class GradRecorder(TrainerCallback):
    """Before each optimizer step: which rows of every lora_B / columns of every lora_A got a gradient."""

    def __init__(self):
        self.model, self.steps = None, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        rows_B, cols_A = set(), set()
        for layer in inject.lora_layers(self.model).values():
            rows_B |= set(torch.nonzero(layer.lora_B.grad.abs().sum(1)).flatten().tolist())
            cols_A |= set(torch.nonzero(layer.lora_A.grad.abs().sum(0)).flatten().tolist())
        self.steps.append((rows_B, cols_A))


@pytest.mark.parametrize("method", METHODS)
def test_p_decides_which_columns_get_gradients(tiny_model_dir, tmp_path, method):
    recorder = GradRecorder()
    trainer = build_trainer(tiny_config(tiny_model_dir, tmp_path / "a", method=method), [recorder])
    recorder.model = trainer.model
    trainer.train()
    if method == "dylora":
        (dylora,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, DyLoRACallback)]
        widths = dylora.sampled_ranks  # b of each step
        assert widths == [dylora_rank(TRAIN_RANKS, 3, step) for step in range(3)]
    else:
        widths = [R_MAX if method == "lora" else max(TRAIN_RANKS)] * 3
    b_trained = 0  # lora_B rows that are non-zero so far (B starts at zero)
    for (rows_B, cols_A), width in zip(recorder.steps, widths, strict=True):
        assert rows_B == set(range(width))
        assert cols_A == set(range(min(width, b_trained)))  # A learns only where B is already non-zero
        b_trained = max(b_trained, width)


def test_dylora_rank_is_a_seeded_function_of_the_step():
    ranks = [dylora_rank(TRAIN_RANKS, 0, step) for step in range(64)]
    assert ranks == [dylora_rank(TRAIN_RANKS, 0, step) for step in range(64)]
    assert set(ranks) == set(TRAIN_RANKS)  # every rank gets sampled
    assert ranks != [dylora_rank(TRAIN_RANKS, 1, step) for step in range(64)]


class Interrupt(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_model_dir, tmp_path):
    # DyLoRA: the sampled ranks must resume too. 12 examples / batch 4 = 3 steps per epoch, so the
    # interruption (before step 5) falls inside the second epoch.
    common = dict(method="dylora", num_train=12, max_steps=6, save_every=2)
    full = store.load_adapter(train(tiny_config(tiny_model_dir, tmp_path / "full", **common)))
    cut_cfg = tiny_config(tiny_model_dir, tmp_path / "cut", **common)
    with pytest.raises(KeyboardInterrupt):
        train(cut_cfg, [Interrupt(at_step=5)])
    assert not (tmp_path / "cut").exists()
    assert (checkpoint_dir(tmp_path / "cut") / "checkpoint-4").is_dir()
    resumed = store.load_adapter(train(tiny_config(tiny_model_dir, tmp_path / "cut", resume=True, **common)))
    assert full.weights.keys() == resumed.weights.keys()
    for path, (lora_A, lora_B) in full.weights.items():
        torch.testing.assert_close(resumed.weights[path][0], lora_A, rtol=0, atol=1e-7)
        torch.testing.assert_close(resumed.weights[path][1], lora_B, rtol=0, atol=1e-7)
    assert any(b.abs().sum() > 0 for _, b in full.weights.values())  # it did train


def test_checkpoints_and_output_are_adapters(tiny_model_dir, tmp_path):
    out = train(tiny_config(tiny_model_dir, tmp_path / "m", max_steps=2, save_every=1, nest=False))
    manifest = store.load_adapter(out).manifest
    assert (manifest.method, manifest.r_max, tuple(manifest.train_ranks), manifest.name) == (
        "matryoshka",
        R_MAX,
        TRAIN_RANKS,
        "m",
    )
    assert "retrain:" in manifest.notes
    for step in (1, 2):
        checkpoint = store.load_adapter(checkpoint_dir(out) / f"checkpoint-{step}")
        assert checkpoint.manifest.base_fingerprint == manifest.base_fingerprint
    final, last = store.load_adapter(out), store.load_adapter(checkpoint_dir(out) / "checkpoint-2")
    for path, (lora_A, lora_B) in final.weights.items():
        assert torch.equal(last.weights[path][0], lora_A) and torch.equal(last.weights[path][1], lora_B)


@pytest.mark.parametrize(
    "overrides, what",
    [
        (dict(method="qlora"), "method"),
        (dict(scaling="log"), "scaling"),
        (dict(task=None), "data source"),
        (dict(data="x.jsonl"), "data source"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_steps=0), "max_steps"),
        (dict(task="nope"), "task"),
    ],
)
def test_bad_config_is_rejected_before_loading(tmp_path, overrides, what):
    with pytest.raises(ConfigError) as info:
        tiny_config("unused", tmp_path / "x", **overrides).validate()
    assert info.value.what == what


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_runs_in_bf16_and_saves_float32(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "gpu", method="matryoshka", nest=False)
    trainer = build_trainer(cfg)
    assert trainer.args.bf16 == torch.cuda.is_bf16_supported()
    assert trainer.model.device.type == "cuda"
    adapter = store.load_adapter(train(cfg))
    for lora_A, lora_B in adapter.weights.values():
        assert lora_A.dtype == lora_B.dtype == torch.float32
        assert lora_B[max(TRAIN_RANKS) :].abs().sum() == 0  # Matryoshka: nothing beyond the largest train rank
    assert any(b[: max(TRAIN_RANKS)].abs().sum() > 0 for _, b in adapter.weights.values())


def test_slice_ranks_are_seeded_and_below_r_max():
    draws = [slice_ranks((1, 2, 4, 8), 8, 2, 0, step) for step in range(50)]
    assert draws == [slice_ranks((1, 2, 4, 8), 8, 2, 0, step) for step in range(50)]
    assert {r for d in draws for r in d} == {1, 2, 4} and all(len(d) == 2 for d in draws)
    assert draws != [slice_ranks((1, 2, 4, 8), 8, 2, 1, step) for step in range(50)]


def test_slice_loss_adds_the_served_rank_losses(tiny_model_dir, tmp_path):
    trainer = build_trainer(tiny_config(tiny_model_dir, tmp_path / "s", method="matryoshka", slice_loss=2, bf16=False))
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        total = trainer.compute_loss(model, dict(batch))
        with_p = model(**batch).loss
        served = []
        for rank in slice_ranks(TRAIN_RANKS, R_MAX, 2, 3, 0):
            inject.set_inference_ranks(model, rank)
            served.append(model(**batch).loss)
        inject.set_inference_ranks(model, None)
    torch.testing.assert_close(total, with_p + sum(served) / 2)
    assert all(layer.inference_ranks is None for layer in inject.lora_layers(model).values())


def test_nest_and_rank_losses(tiny_model_dir, tmp_path):
    out = train(
        tiny_config(tiny_model_dir, tmp_path / "n", method="lora", rank_loss_every=2, bf16=False)
    )  # nest: the default
    nested, raw = store.load_adapter(out), store.load_adapter(tmp_path / "n-raw")
    assert (nested.manifest.method, raw.manifest.method) == ("svd", "lora")
    assert (nested.manifest.name, raw.manifest.name) == ("n", "n-raw")
    lines = (checkpoint_dir(out) / "rank_losses.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["step"] for row in rows] == [2, 3]
    assert all(set(row["loss"]) == {"1", "2", "4"} for row in rows)


@pytest.mark.parametrize(
    "overrides", [dict(slice_loss=-1), dict(rank_loss_every=0), dict(train_ranks=(8,), slice_loss=1)]
)
def test_bad_options_are_refused(tiny_model_dir, tmp_path, overrides):
    with pytest.raises(ConfigError):
        tiny_config(tiny_model_dir, tmp_path / "x", **overrides).validate()
