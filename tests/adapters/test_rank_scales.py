"""The per-rank serving scale c_r: validated in the manifest, round-trips through it, and every backend
serves rank r at alpha * s_r * c_r (our layer, the engine, the PEFT export the vLLM backend uses)."""

import pytest
import torch

from matryoshka_lora.adapters import inject, peft_io, store
from matryoshka_lora.errors import AdapterFormatError, ConfigError
from matryoshka_lora.models import load_base_model


def greedy_tokens(engine, cases) -> list[list[int]]:
    """Greedy ignore-EOS tokens of each (adapter, rank) on one prompt, all in one batch."""
    from matryoshka_lora.types import GenerationRequest, SamplingParams

    out = [[] for _ in cases]
    for i, (adapter, rank) in enumerate(cases):
        request = GenerationRequest(
            f"r{i}", (5, 17, 33, 9), SamplingParams(max_tokens=8, ignore_eos=True), adapter, rank
        )
        engine.add_request(request, lambda event, i=i: out[i].extend(event.token_ids))
    while engine.scheduler.has_work():
        engine.step()
    return out


TOKENS = torch.tensor([[5, 9, 17, 3, 44, 2, 90]])


def saved_adapter(model, out, rank_scales=None, scale_rows=None):
    """A random r_max-8 sqrt-scaled adapter; scale_rows (k, c) multiplies B[:k] by c (the reference)."""
    from matryoshka_lora.adapters.random_adapter import save_random_adapter

    path = save_random_adapter(
        model,
        out,
        out.name,
        8,
        scaling="sqrt",
        alpha=2.0,
        target_modules=("q_proj", "v_proj", "down_proj"),
        seed=4,
        std=0.3,
    )
    adapter = store.load_adapter(path)
    if scale_rows:
        k, c = scale_rows
        for _, lora_B in adapter.weights.values():
            lora_B[:k] *= c
    adapter.manifest.rank_scales = rank_scales
    adapter.manifest.validate()
    return store.save_adapter(path, adapter.manifest, adapter.weights)


@pytest.mark.parametrize(
    "scales, stored",
    [({"2": 1.5}, {"2": 1.5}), ({4: 2, "1": 0.5}, {"1": 0.5, "4": 2.0}), (None, None)],
)
def test_rank_scales_round_trip(tiny_model_dir, tmp_path, scales, stored):
    model, _ = load_base_model(tiny_model_dir)
    path = saved_adapter(model, tmp_path / "a", rank_scales=scales)
    manifest = store.read_manifest(path)
    assert manifest.rank_scales == stored
    assert manifest.served_scale(4) == pytest.approx(2.0 / 2 * (stored or {}).get("4", 1.0))
    assert store.update_manifest(path, rank_scales={"3": 1.25}).rank_scales == {"3": 1.25}
    assert store.read_manifest(path).rank_scales == {"3": 1.25}


@pytest.mark.parametrize("bad", [{"0": 1.0}, {"9": 1.0}, {"2": 0}, {"2": float("nan")}, {"x": 1}, {"2": True}, [1.0]])
def test_bad_rank_scales_are_refused(tiny_model_dir, tmp_path, bad):
    model, _ = load_base_model(tiny_model_dir)
    path = saved_adapter(model, tmp_path / "a")
    with pytest.raises(ConfigError, match="rank_scales"):
        store.update_manifest(path, rank_scales=bad)
    text = (path / "manifest.json").read_text().replace('"rank_scales": null', '"rank_scales": {"0": 2}')
    with pytest.raises(AdapterFormatError, match="rank_scales"):
        store.AdapterManifest.from_json(text)


def test_layer_and_peft_export_serve_the_scaled_slice(tiny_model_dir, tmp_path):
    from peft import PeftModel

    model, _ = load_base_model(tiny_model_dir)
    scaled = saved_adapter(model, tmp_path / "scaled", rank_scales={"2": 1.7})
    reference = saved_adapter(model, tmp_path / "ref", scale_rows=(2, 1.7))
    outputs = {}
    for name, path in (("scaled", scaled), ("ref", reference)):
        served, _ = load_base_model(tiny_model_dir)
        store.attach_adapter(served, store.load_adapter(path))
        inject.set_inference_ranks(served, 2)
        base, _ = load_base_model(tiny_model_dir)
        peft_model = PeftModel.from_pretrained(
            base, str(peft_io.export_peft(path, 2, tmp_path / f"{name}-peft"))
        ).eval()
        with torch.no_grad():
            outputs[name] = served(TOKENS).logits, peft_model(TOKENS).logits
    torch.testing.assert_close(outputs["scaled"][0], outputs["ref"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["scaled"][1], outputs["ref"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["ref"][1], outputs["ref"][0], atol=1e-5, rtol=1e-5)


def test_engine_serves_the_scaled_slice(tiny_model_dir, tmp_path):
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine

    model, tokenizer = load_base_model(tiny_model_dir)
    saved_adapter(model, tmp_path / "dir" / "scaled", rank_scales={"2": 3.0})
    saved_adapter(model, tmp_path / "dir" / "ref", scale_rows=(2, 3.0))
    engine = LLMEngine(
        EngineConfig(adapters=[str(tmp_path / "dir")], max_num_seqs=4, max_model_len=64, warmup=False),
        hf_model=model,
        tokenizer=tokenizer,
    )
    scaled_2, ref_2, base = greedy_tokens(engine, [("scaled", 2), ("ref", 2), (None, None)])
    assert scaled_2 == ref_2 and scaled_2 != base
