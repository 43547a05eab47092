"""export / import / demo through the typer app, on the saved tiny Llama."""

import json
import re

import torch
from typer.testing import CliRunner

from matryoshka_lora.adapters import demo, inject, store
from matryoshka_lora.adapters.p import METHODS
from matryoshka_lora.cli import app

runner = CliRunner()


def test_help_lists_the_adapter_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("export", "import", "demo"):
        assert command in result.output
    assert "--rank" in runner.invoke(app, ["export", "--help"]).output


def test_train_help_names_every_method():
    text = " ".join(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).output.split())
    assert " | ".join(METHODS) in text


def make_peft(tiny_model_dir, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    peft_model.save_pretrained(str(out))


def test_import_then_export_round_trips_the_peft_weights(tiny_model_dir, tmp_path):
    make_peft(tiny_model_dir, tmp_path / "peft")
    result = runner.invoke(
        app,
        [
            "import",
            str(tmp_path / "peft"),
            "--out",
            str(tmp_path / "ours"),
            "--model",
            str(tiny_model_dir),
            "--name",
            "imported",
        ],
    )
    assert result.exit_code == 0, result.output
    adapter = store.load_adapter(tmp_path / "ours")
    assert adapter.manifest.name == "imported" and adapter.manifest.r_max == 4

    result = runner.invoke(app, ["export", str(tmp_path / "ours"), "--rank", "4", "--out", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    def deltas(directory):
        config = json.loads((directory / "adapter_config.json").read_text())
        t = load_file(str(directory / "adapter_model.safetensors"))
        scale = config["lora_alpha"] / config["r"]
        return {
            k[: -len(".lora_A.weight")]: scale * t[k.replace("lora_A", "lora_B")] @ t[k] for k in t if "lora_A" in k
        }

    original, back = deltas(tmp_path / "peft"), deltas(tmp_path / "back")
    assert original.keys() == back.keys() and len(original) == 4
    for key in original:
        torch.testing.assert_close(back[key], original[key], atol=1e-5, rtol=1e-4)


def test_export_refuses_a_rank_above_r_max(tiny_model_dir, tmp_path):
    make_peft(tiny_model_dir, tmp_path / "peft")
    runner.invoke(
        app, ["import", str(tmp_path / "peft"), "--out", str(tmp_path / "ours"), "--model", str(tiny_model_dir)]
    )
    result = runner.invoke(app, ["export", str(tmp_path / "ours"), "--rank", "5", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "rank" in str(result.exception)


def demo_lines(output):
    return re.findall(r"^.*?\[rank (\d+)\] (.*)$", output, flags=re.M)


def test_demo_with_a_fresh_adapter_equals_the_base_at_every_rank(tiny_model_dir):
    result = runner.invoke(
        app,
        [
            "demo",
            "--model",
            str(tiny_model_dir),
            "--ranks",
            "16,0,2",
            "--max-new-tokens",
            "4",
            "--prompt",
            "Count to five",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = demo_lines(result.output)
    assert [rank for rank, _ in lines] == ["0", "2", "16"]
    assert len({text for _, text in lines}) == 1  # zero B: the base text at every rank


def test_demo_with_an_adapter_generates_at_each_rank(tiny_model_dir, tmp_path):
    from matryoshka_lora.models import load_base_model, model_fingerprint, model_id

    model, tokenizer = load_base_model(tiny_model_dir)
    base_text = demo.generate(model, tokenizer, "Count to five", 6)
    manifest = store.AdapterManifest(
        name="rand",
        base_model=model_id(model),
        base_fingerprint=model_fingerprint(model),
        target_modules=inject.DEFAULT_TARGET_MODULES,
        r_max=4,
        train_ranks=(1, 2, 4),
        scaling="none",
        method="matryoshka",
    )
    inject.inject_lora(model, 4, seed=0)
    with torch.no_grad():
        for layer in inject.lora_layers(model).values():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(0))
    inject.set_inference_ranks(model, 4)
    rank4_text = demo.generate(model, tokenizer, "Count to five", 6)
    store.save_adapter(tmp_path / "rand", manifest, store.adapter_from_model(model, manifest).weights)
    results = demo.run_demo(str(tiny_model_dir), [0, 4, 8], "Count to five", tmp_path / "rand", 6)
    assert results == [(0, base_text), (4, rank4_text)] and rank4_text != base_text  # rank 8 > r_max: skipped


def test_demo_prefers_a_shipped_matryoshka_adapter_for_the_model(tiny_model, tmp_path):
    from matryoshka_lora.models import model_fingerprint, model_id

    fingerprint = model_fingerprint(tiny_model)
    inject.inject_lora(tiny_model, 2, target_modules=("q_proj",))
    for name, method in (("a-lora", "lora"), ("b-mat", "matryoshka")):
        manifest = store.AdapterManifest(
            name=name,
            base_model=model_id(tiny_model),
            base_fingerprint=fingerprint,
            target_modules=("q_proj",),
            r_max=2,
            train_ranks=(1, 2),
            scaling="none",
            method=method,
        )
        store.save_adapter(tmp_path / name, manifest, store.adapter_from_model(tiny_model, manifest).weights)
    assert demo.find_shipped_adapter(fingerprint, tmp_path).manifest.name == "b-mat"
    assert demo.find_shipped_adapter("0" * 16, tmp_path) is None
