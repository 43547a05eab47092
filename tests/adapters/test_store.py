"""The adapter format: round trip, attach == the trained model, and every refusal of a bad directory."""

import json

import pytest
import torch

from matryoshka_lora.adapters import inject, store
from matryoshka_lora.errors import AdapterFormatError, BaseModelMismatchError, ConfigError
from matryoshka_lora.models import model_fingerprint, model_id

TOKENS = torch.tensor([[5, 9, 17, 3, 44, 2]])
TARGETS = ("q_proj", "v_proj", "down_proj")


def make_manifest(model, **overrides):
    values = dict(
        name="tiny-adapter",
        base_model=model_id(model),
        base_fingerprint=model_fingerprint(model),
        target_modules=TARGETS,
        r_max=4,
        train_ranks=(1, 2, 4),
        scaling="sqrt",
        method="matryoshka",
        alpha=2.0,
    )
    return store.AdapterManifest(**(values | overrides))


@pytest.fixture
def saved(tiny_model, tmp_path):
    """(model with a trained-looking adapter, its manifest, the saved directory)."""
    manifest = make_manifest(tiny_model)
    inject.inject_lora(tiny_model, 4, "sqrt", TARGETS, alpha=2.0, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in inject.lora_layers(tiny_model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)
    out = tmp_path / "adapter"
    store.save_adapter(out, manifest, store.adapter_from_model(tiny_model, manifest).weights)
    return tiny_model, manifest, out


def fresh_tiny(config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # same init as the tiny_model fixture: same base weights
    return LlamaForCausalLM(config).eval()


def test_manifest_json_roundtrip(tiny_model):
    manifest = make_manifest(tiny_model, eval_results={"task": "x", "accuracy": {"1": 0.5}}, notes="hi")
    again = store.AdapterManifest.from_json(manifest.to_json())
    assert again == manifest and isinstance(again.train_ranks, tuple) and isinstance(again.target_modules, tuple)


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", ""),
        ("name", "a b"),
        ("name", "../x"),
        ("r_max", 0),
        ("r_max", 2.0),
        ("train_ranks", (2, 1)),
        ("train_ranks", (1, 8)),
        ("train_ranks", ()),
        ("scaling", "log"),
        ("method", "qlora"),
        ("alpha", -1.0),
        ("target_modules", ()),
        ("target_modules", "q_proj"),
        ("format_version", 2),
        ("eval_results", [1]),
        ("base_fingerprint", ""),
    ],
)
def test_manifest_rejects_bad_fields(tiny_model, field, value):
    with pytest.raises(ConfigError) as info:
        make_manifest(tiny_model, **{field: value})
    assert info.value.given == value or field in ("target_modules", "train_ranks")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: "[]", "JSON object"),
        (lambda d: json.dumps({k: v for k, v in d.items() if k != "r_max"}), "missing fields"),
        (lambda d: json.dumps(d | {"rmax": 4}), "unknown fields"),
        (lambda d: json.dumps(d | {"format_version": 99}), "format_version"),
        (lambda d: json.dumps(d | {"scaling": "log"}), "scaling"),
    ],
)
def test_manifest_from_json_errors(tiny_model, edit, message):
    values = json.loads(make_manifest(tiny_model).to_json())
    with pytest.raises(AdapterFormatError, match=message):
        store.AdapterManifest.from_json(edit(values))


def test_save_load_attach_reproduces_the_model(saved):
    model, manifest, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "manifest.json"]
    adapter = store.load_adapter(out, base_fingerprint=manifest.base_fingerprint)
    assert adapter.manifest == manifest and adapter.path == out and len(adapter.weights) == 6
    other = fresh_tiny(model.config)
    store.attach_adapter(other, adapter)
    with torch.no_grad():
        for rank in (None, 0, 1, 2, 4):
            inject.set_inference_ranks(model, rank)
            inject.set_inference_ranks(other, rank)
            torch.testing.assert_close(other(TOKENS).logits, model(TOKENS).logits)


def test_saving_over_an_existing_directory_keeps_other_files(saved, tiny_model):
    model, manifest, out = saved
    (out / "trainer_state.json").write_text("{}")
    manifest.notes = "second save"
    store.save_adapter(out, manifest, store.adapter_from_model(model, manifest).weights)
    assert store.load_adapter(out).manifest.notes == "second save" and (out / "trainer_state.json").exists()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_mismatched_base_is_refused(saved):
    model, manifest, out = saved
    with pytest.raises(BaseModelMismatchError):
        store.load_adapter(out, base_fingerprint="0" * 16)
    from transformers import LlamaForCausalLM

    torch.manual_seed(123)
    with pytest.raises(BaseModelMismatchError):
        store.attach_adapter(LlamaForCausalLM(model.config), store.load_adapter(out))


def rewrite_tensors(out, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(out / "adapter.safetensors"))
    change(tensors)
    save_file(tensors, str(out / "adapter.safetensors"))


def set_key(key, value):
    return lambda t: t.__setitem__(key, value)


def add_up_proj(tensors):
    tensors["model.layers.0.mlp.up_proj.lora_A"] = torch.zeros(32, 4)
    tensors["model.layers.0.mlp.up_proj.lora_B"] = torch.zeros(4, 64)


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda out: (out / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda out: (out / "adapter.safetensors").unlink(), "adapter.safetensors is missing"),
        (lambda out: (out / "adapter.safetensors").write_bytes(b"garbage"), "not a readable safetensors"),
        (lambda out: (out / "manifest.json").write_text("{"), "not valid JSON"),
        (lambda out: rewrite_tensors(out, lambda t: t.pop(f"{Q}.lora_B")), "missing tensors"),
        (lambda out: rewrite_tensors(out, set_key("extra.weight", torch.zeros(2))), "unexpected tensors"),
        (lambda out: rewrite_tensors(out, set_key(f"{Q}.lora_A", torch.zeros(32, 8))), "do not match r_max"),
        (lambda out: rewrite_tensors(out, set_key(f"{Q}.lora_B", torch.zeros(3, 32))), "do not match r_max"),
        (lambda out: rewrite_tensors(out, set_key(f"{Q}.lora_B", torch.full((4, 32), float("nan")))), "NaN"),
        (lambda out: rewrite_tensors(out, set_key(f"{Q}.lora_B", torch.zeros(4, 32, dtype=torch.int32))), "float"),
        (lambda out: rewrite_tensors(out, add_up_proj), "target_modules"),
        (
            lambda out: rewrite_tensors(out, lambda t: [t.pop(k) for k in list(t) if "v_proj" in k]),
            "no tensors for target",
        ),
    ],
)
def test_load_refuses_a_damaged_directory(saved, damage, message):
    _, _, out = saved
    damage(out)
    with pytest.raises(AdapterFormatError, match=message):
        store.load_adapter(out)


def test_load_refuses_a_missing_directory(tmp_path):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        store.load_adapter(tmp_path / "nope")


def test_attach_refuses_an_adapter_for_other_modules(saved):
    model, manifest, out = saved
    adapter = store.load_adapter(out)
    adapter.weights["model.layers.7.self_attn.q_proj"] = adapter.weights[Q]
    with pytest.raises(AdapterFormatError, match="unexpected"):
        store.attach_adapter(fresh_tiny(model.config), adapter)


def test_update_eval_results(saved):
    _, manifest, out = saved
    results = {"task": "arith", "accuracy": {"1": 0.25, "4": 0.5}, "aurac_log2": 0.4}
    store.update_eval_results(out, results)
    assert store.load_adapter(out).manifest.eval_results == results
    store.update_eval_results(out, None)
    assert store.load_adapter(out).manifest.eval_results is None
