"""Rank-sweep evaluation on the tiny model: per-rank accuracy, AURAC and the manifest; the plot file."""

from __future__ import annotations

import json
import random

import pytest
import torch

from matryoshka_lora.adapters import inject, store
from matryoshka_lora.errors import ConfigError
from matryoshka_lora.metrics import aurac
from matryoshka_lora.models import load_base_model, model_fingerprint, model_id
from matryoshka_lora.training import evaluate as ev
from matryoshka_lora.training import plots, tasks

R_MAX = 8


def parity_task() -> tasks.Task:
    """A task any model can score on: the answer is right when the first line has an even length."""

    def make(rng: random.Random) -> tasks.Example:
        return tasks.Example(" ".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))), "even")

    def parse(text: str) -> str:
        return "even" if len(tasks.first_line(text)) % 2 == 0 else "odd"

    return tasks.Task("parity", "test-only task", make, parse, max_new_tokens=4)


def make_adapter(model_dir, out, seed=0):
    """A tiny adapter with random non-zero B, so that every rank changes the output."""
    model, _ = load_base_model(model_dir)
    manifest = store.AdapterManifest(
        name=out.name,
        base_model=model_id(model),
        base_fingerprint=model_fingerprint(model),
        target_modules=("q_proj", "v_proj", "down_proj"),
        r_max=R_MAX,
        train_ranks=(1, 2, 4, 8),
        scaling="none",
        method="matryoshka",
    )
    inject.inject_lora(model, R_MAX, "none", manifest.target_modules, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for layer in inject.lora_layers(model).values():
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=generator)
    store.save_adapter(out, manifest, store.adapter_from_model(model, manifest).weights)
    return out


def truncated_reference(model_dir, adapter_path, task, examples, rank):
    """Accuracy at `rank` the long way: zero every column of A / row of B from `rank` on, run at r_max."""
    adapter = store.load_adapter(adapter_path)
    for lora_A, lora_B in adapter.weights.values():
        lora_A[:, rank:] = 0
        lora_B[rank:] = 0
    model, tokenizer = load_base_model(model_dir)
    store.attach_adapter(model, adapter)
    inject.set_inference_ranks(model, R_MAX)  # scaling "none": s_rank == s_r_max == 1
    completions = ev.generate_completions(model, tokenizer, [ex.prompt for ex in examples], task.max_new_tokens, 5)
    return ev.accuracy(task, completions, examples)


@pytest.mark.parametrize(
    "backend, max_num_seqs", [("engine", 64), ("engine", 1), ("hf", 64)], ids=["engine", "engine-one-at-a-time", "hf"]
)
def test_rank_sweep_matches_truncated_adapters_and_updates_manifest(
    tiny_model_dir, tmp_path, monkeypatch, backend, max_num_seqs
):
    """Both backends (the serving engine with every rank in one batch or one sequence at a time, and HF
    generate per rank) give the accuracy of the adapter truncated the long way, through HF."""
    monkeypatch.setitem(tasks.TASKS, "parity", parity_task())
    path = make_adapter(tiny_model_dir, tmp_path / "tiny-adapter")
    cfg = ev.EvalConfig(
        adapters=(path,),
        task="parity",
        ranks=(1, 2, 8, 64),
        num_test=15,
        batch_size=5,
        max_num_seqs=max_num_seqs,
        model=str(tiny_model_dir),
        backend=backend,
    )
    result = ev.evaluate(cfg)
    (entry,) = result["adapters"]
    assert entry["ranks"] == [1, 2, 8]  # 64 > r_max is dropped
    assert result["weight_format"] == "float32"  # the tiny model has no GGUF file
    examples = tasks.task_examples("parity", "test", 15)
    expected = {
        str(r): truncated_reference(tiny_model_dir, path, tasks.TASKS["parity"], examples, r) for r in (1, 2, 8)
    }
    assert entry["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert len(set(expected.values()) | {result["base_accuracy"]}) > 1  # the ranks really differ here
    accs = [expected[str(r)] for r in (1, 2, 8)]
    assert entry["aurac_log2"] == pytest.approx(aurac([1, 2, 8], accs, axis="log2"))
    assert entry["aurac_linear"] == pytest.approx(aurac([1, 2, 8], accs, axis="linear"))
    stored = store.load_adapter(path).manifest.eval_results
    assert stored == json.loads(json.dumps(ev.manifest_results(result, entry)))
    assert stored["accuracy"] == entry["accuracy"] and stored["base_accuracy"] == result["base_accuracy"]
    table = ev.format_table(result)
    assert "tiny-adapter" in table and f"{100 * entry['aurac_log2']:.1f}" in table


@pytest.mark.parametrize(
    "field, value",
    [("backend", "vllm"), ("split", "train"), ("weight_format", "int3"), ("max_num_seqs", 0), ("num_test", 0)],
)
def test_bad_eval_options_are_refused(tmp_path, field, value):
    with pytest.raises(ConfigError, match=field):
        ev.EvalConfig(adapters=(tmp_path,), task="reverse", **{field: value}).validate()


@pytest.mark.parametrize("split, update_manifests", [("test", False), ("dev", True)])
def test_default_ranks_are_the_train_ranks_and_manifest_only_from_test(
    tiny_model_dir, tmp_path, monkeypatch, split, update_manifests
):
    monkeypatch.setitem(tasks.TASKS, "parity", parity_task())
    path = make_adapter(tiny_model_dir, tmp_path / "a")
    cfg = ev.EvalConfig(
        adapters=(path,),
        task="parity",
        num_test=4,
        split=split,
        batch_size=4,
        model=str(tiny_model_dir),
        update_manifests=update_manifests,
    )
    result = ev.evaluate(cfg)
    assert result["adapters"][0]["ranks"] == [1, 2, 4, 8] and result["split"] == split
    assert store.load_adapter(path).manifest.eval_results is None  # dev results pick settings, never ship


@pytest.mark.slow  # the real default model
def test_batched_left_padded_generation_equals_one_at_a_time(default_model):
    model, tokenizer = default_model
    prompts = ["What is 2 + 2?", "Name a color.", "Reverse this list of letters: a b c d e"]
    batched = ev.generate_completions(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [ev.generate_completions(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_plot_is_a_png_with_every_curve(tmp_path):
    import matplotlib.image

    result = {
        "task": "reverse",
        "num_test": 10,
        "base_accuracy": 0.1,
        "adapters": [
            {"name": n, "ranks": [1, 2, 4], "accuracy": {"1": a, "2": a + 0.1, "4": a + 0.2}, "aurac_log2": a + 0.1}
            for n, a in (("m", 0.5), ("l", 0.2))
        ],
    }
    out = plots.plot_rank_curves(result, tmp_path / "sub" / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(out).shape[:2]
    assert (width, height) == (640, 400)
