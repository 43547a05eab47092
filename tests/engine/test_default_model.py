"""On the real default model: a mixed-rank, mixed-adapter batch gives the tokens each request gets alone."""

from __future__ import annotations

import pytest

from .engine_support import request, run, tokens


@pytest.mark.slow
def test_mixed_ranks_equal_alone_on_default_model(default_model, tmp_path):
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine

    model, tokenizer = default_model
    save_random_adapter(model, tmp_path / "a", "a", 16, seed=1, std=0.15)
    save_random_adapter(
        model, tmp_path / "b", "b", 8, scaling="sqrt", seed=2, std=0.02, target_modules=("q_proj", "v_proj")
    )
    engine = LLMEngine(
        EngineConfig(
            adapters=[str(tmp_path / "a"), str(tmp_path / "b")], max_num_seqs=8, max_model_len=256, warmup=False
        ),
        hf_model=model,
        tokenizer=tokenizer,
    )
    prompts = [tokenizer(p)["input_ids"] for p in ("The capital of France is", "1, 2, 3, 4,", "def add(a, b):")]
    cases = [(None, None, 0), ("a", 1, 1), ("a", 16, 0), ("b", 8, 2), ("b", 1, 1)]
    reqs = [request(i, a, r, max_tokens=3, prompt=prompts[p]) for i, (a, r, p) in enumerate(cases)]
    together = run(engine, reqs)
    alone = {r.request_id: tokens(run(engine, [r])[r.request_id]) for r in reqs}
    assert {k: tokens(v) for k, v in together.items()} == alone
    assert alone["req-0"] != alone["req-2"]  # same prompt, base vs adapter: the adapter matters


@pytest.mark.slow
def test_gguf_blocks_generate_what_float32_does_on_default_model(default_model, monkeypatch):
    """The shipped file's own blocks (one sequence alone, and four together) give float32's greedy tokens on
    float activations (the kernels built without int8 rows; what int8 activations change is measured in
    docs/performance.md, "A decode step")."""
    from matryoshka_lora.engine import cpu_kernels
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine

    monkeypatch.setattr(cpu_kernels, "FLAGS", (*cpu_kernels.FLAGS, "-DML_NO_INT8_ROW"))

    model, tokenizer = default_model
    prompts = [
        tokenizer(p)["input_ids"]
        for p in ("The capital of France is", "1, 2, 3, 4,", "def add(a, b):", "Once upon a time")
    ]
    outputs = {}
    for weight_format in ("gguf", "float32"):
        engine = LLMEngine(
            EngineConfig(max_num_seqs=4, max_model_len=128, warmup=False, weight_format=weight_format),
            hf_model=model,
            tokenizer=tokenizer,
        )
        assert engine.weight_format == weight_format
        alone = tokens(run(engine, [request(0, max_tokens=24, prompt=prompts[0])])["req-0"])
        together = run(engine, [request(i, max_tokens=24, prompt=p) for i, p in enumerate(prompts)])
        outputs[weight_format] = (alone, {k: tokens(v) for k, v in together.items()})
    assert outputs["gguf"] == outputs["float32"]
