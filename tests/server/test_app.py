"""The app factory's choice of engine."""

from __future__ import annotations

import importlib.util

import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.server import ServerSettings
from matryoshka_lora.server.app import build_backend

NO_VLLM = importlib.util.find_spec("vllm") is None


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="vLLM is not importable"):
        build_backend(ServerSettings(backend="vllm", adapters=[]))


@pytest.mark.parametrize("kind", ["native", "auto"])
def test_native_and_auto_without_a_gpu_build_the_native_engine(kind, tiny_model_dir):
    import torch

    from matryoshka_lora.backends.native import NativeBackend

    if kind == "auto" and not NO_VLLM and torch.cuda.is_available():
        pytest.skip("auto picks vLLM on this machine")
    backend = build_backend(ServerSettings(backend=kind, model=str(tiny_model_dir), adapters=[], max_num_seqs=3))
    assert isinstance(backend, NativeBackend) and not backend.ready
    assert (backend.config.model, backend.config.max_num_seqs) == (str(tiny_model_dir), 3)
