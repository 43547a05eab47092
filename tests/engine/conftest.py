"""Fixtures of the engine tests: tiny random adapters (non-zero B, so ranks differ) on the tiny model."""

from __future__ import annotations

import pytest

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def tiny_hf(tiny_model_dir):
    """(model, tokenizer) loaded from the saved tiny directory, as the engine loads it. Do not mutate."""
    from matryoshka_lora.models import load_base_model

    return load_base_model(tiny_model_dir)


@pytest.fixture(scope="session")
def engine_adapters(tiny_hf, tmp_path_factory):
    """A folder with alpha (r_max 8, every target, scaling none) and beta (r_max 4, q/v/down, sqrt, alpha 2);
    gamma (r_max 4) lies outside it, for hot loading."""
    from matryoshka_lora.adapters.random_adapter import save_random_adapter

    model, _ = tiny_hf
    root = tmp_path_factory.mktemp("engine-adapters")
    save_random_adapter(model, root / "served" / "alpha", "alpha", 8, seed=1, std=0.3)
    save_random_adapter(
        model,
        root / "served" / "beta",
        "beta",
        4,
        scaling="sqrt",
        alpha=2.0,
        target_modules=("q_proj", "v_proj", "down_proj"),
        seed=2,
        std=0.3,
    )
    save_random_adapter(model, root / "gamma", "gamma", 4, seed=3, std=0.3)
    return {
        "dir": root / "served",
        "alpha": root / "served" / "alpha",
        "beta": root / "served" / "beta",
        "gamma": root / "gamma",
    }


@pytest.fixture
def make_engine(tiny_hf, tiny_model_dir, engine_adapters):
    """Build an LLMEngine on the tiny model (no loop thread: tests call step()), adapters alpha + beta."""
    from matryoshka_lora.engine.config import EngineConfig
    from matryoshka_lora.engine.engine import LLMEngine

    def make(**overrides):
        values = {
            "model": str(tiny_model_dir),
            "adapters": [str(engine_adapters["dir"])],
            "max_num_seqs": 4,
            "max_model_len": 128,
            "num_threads": None,
            "warmup": False,
        }
        values.update(overrides)
        model, tokenizer = tiny_hf
        return LLMEngine(EngineConfig(**values), hf_model=model, tokenizer=tokenizer)

    return make


@pytest.fixture(scope="session")
def c_ops():
    """The fused C kernels' op set (skipped where they cannot build)."""
    from matryoshka_lora.engine.cpu_kernels import (
        KernelBuildError,
        build_library,
        load_step_ops,
    )

    try:
        build_library()
    except KernelBuildError as exc:
        pytest.skip(f"C kernels unavailable here: {exc}")
    ops = load_step_ops()
    assert ops.name == "c-kernels"
    return ops


@pytest.fixture(params=["torch", "c-kernels"])
def step_ops(request):
    """Each of the step's op sets: the torch reference and the fused C kernels."""
    from matryoshka_lora.engine.torch_ops import TorchOps

    return TorchOps() if request.param == "torch" else request.getfixturevalue("c_ops")


@pytest.fixture
def gguf_model_dir(tiny_model, tmp_path):
    """A model directory with a .gguf file whose blocks decode to its saved float32 weights."""
    from transformers import AutoTokenizer

    from matryoshka_lora.models import default_model_dir

    from .gguf_support import write_gguf

    tiny_model.config.tie_word_embeddings = True
    write_gguf(tiny_model, tmp_path / "model.gguf")
    tiny_model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(tmp_path)
    return tmp_path
