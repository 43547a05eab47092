"""Server test helpers: a real uvicorn on a free loopback port (in a thread), tenants files, metrics parsing."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from matryoshka_lora.server.tenants import hash_key

KEYS = {"acme": "key-acme", "globex": "key-globex", "root": "key-root", "slow": "key-slow", "limited": "key-limited"}


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def write_tenants(path: Path, adapters_of_acme: list[str]) -> Path:
    """acme: listed adapters, max_rank 4, rate 1000/s; globex: all adapters; root: admin; slow:
    max_concurrency 1; limited: burst 2 at 0.01 requests/s (429 on the third request)."""
    listed = ", ".join(f'"{a}"' for a in adapters_of_acme)
    path.write_text(f"""
[tenants.acme]
api_key_sha256 = "{hash_key(KEYS["acme"])}"
adapters = [{listed}]
max_rank = 4
rate_limit_rps = 1000.0

[tenants.globex]
api_key_sha256 = "{hash_key(KEYS["globex"])}"
adapters = "*"

[tenants.limited]
api_key_sha256 = "{hash_key(KEYS["limited"])}"
rate_limit_rps = 0.01
burst = 2

[tenants.root]
api_key_sha256 = "{hash_key(KEYS["root"])}"
admin = true

[tenants.slow]
api_key_sha256 = "{hash_key(KEYS["slow"])}"
max_concurrency = 1
""")
    return path


@contextlib.contextmanager
def serving(app, ready_timeout_s: float = 120.0, ready_status: int = 200):
    """Run `app` under a real uvicorn on 127.0.0.1:<free port> in a thread; yield its base URL once /ready
    answers `ready_status` (with 503: once the engine has failed to start)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if not thread.is_alive():
                raise RuntimeError("the server thread died during startup")
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(f"{url}/ready", timeout=2)
                if ready.status_code == ready_status and (ready_status == 200 or "failed" in ready.text):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready in time")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted label items): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sse_data(lines) -> list[str]:
    """The `data:` payloads of an SSE stream, in order."""
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def save_tiny_adapter(
    model_dir: Path,
    out_dir: Path,
    name: str,
    r_max: int,
    train_ranks: tuple[int, ...],
    seed: int,
    eval_results: dict | None = None,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj"),
) -> Path:
    """A random adapter (A and B non-zero, so ranks differ) for the model in `model_dir`."""
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.models import load_base_model

    model, _ = load_base_model(model_dir)
    return save_random_adapter(
        model,
        out_dir,
        name,
        r_max,
        target_modules=target_modules,
        seed=seed,
        std=0.5,
        train_ranks=train_ranks,
        eval_results=eval_results,
    )
