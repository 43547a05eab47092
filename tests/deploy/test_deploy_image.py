"""SMOKE: build the `cpu` image target for real and serve from it.

Build (base image and layers cached between runs, see image_support.py), run it with a published
127.0.0.1 port and a tiny random adapter (for the baked default model) on a read-only volume, wait for
/ready, a ranked /generate, /metrics, the HEALTHCHECK script, a non-root server as PID 1, then SIGTERM
while a request is in flight: the request completes with 200 and the container exits 0.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from image_support import build_cpu_image, docker, docker_daemon
from live_support import TINY_ADAPTER, generate, metric_value, require_server, wait_until, write_tiny_adapter

from matryoshka_lora.loadtest.server import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # a cold layer cache builds for ~10 min

IMAGE = "matryoshka-lora:cpu-smoke"
CONTAINER = "matryoshka-lora-smoke"
DRAIN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    """(base URL, docker env, build log) of the running container; removed afterwards."""
    require_server()
    from matryoshka_lora.models import default_model_dir

    work = tmp_path_factory.mktemp("image")
    adapters = work / "adapters"
    write_tiny_adapter(default_model_dir(), adapters)
    for path in [adapters, *adapters.rglob("*")]:  # the server runs as uid 10001
        path.chmod(0o755 if path.is_dir() else 0o644)
    with docker_daemon() as env:
        build_log = build_cpu_image(env, IMAGE, work / "build.log")
        docker("rm", "-f", CONTAINER, env=env, check=False)
        port = free_port()
        docker(
            "run",
            "--detach",
            f"--name={CONTAINER}",
            f"--publish=127.0.0.1:{port}:8000",
            "--env=MATRYOSHKA_ALLOW_OPEN=true",
            "--env=MATRYOSHKA_ADAPTERS=/adapters",
            f"--env=MATRYOSHKA_DRAIN_TIMEOUT_S={DRAIN_TIMEOUT_S}",
            # a short warm-up on a shared CPU: one thread (no OpenMP spinning), a small grid
            "--env=MATRYOSHKA_NUM_THREADS=1",
            "--env=MATRYOSHKA_MAX_NUM_SEQS=2",
            "--env=MATRYOSHKA_MAX_MODEL_LEN=160",
            f"--volume={adapters}:/adapters:ro",
            IMAGE,
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:

            def ready():
                state = docker("inspect", "--format={{.State.Running}}", CONTAINER, env=env).stdout.strip()
                if state != "true":
                    logs = docker("logs", CONTAINER, env=env, check=False)
                    pytest.fail("container exited:\n" + (logs.stdout + logs.stderr)[-4000:])
                return httpx.get(f"{url}/ready", timeout=5).status_code == 200

            wait_until(ready, 420, "/ready of the container")
            yield url, env, build_log
        finally:
            logs = docker("logs", CONTAINER, env=env, check=False)
            (work / "container.log").write_text(logs.stdout + logs.stderr)
            docker("rm", "-f", CONTAINER, env=env, check=False)


def test_build_context_is_small(container):
    _, _, build_log = container
    match = re.search(r"Sending build context to Docker daemon\s+([\d.]+)([kMG]?B)", build_log)
    assert match, "no context size in the build log"
    size, unit = float(match.group(1)), match.group(2)
    assert unit in ("B", "kB") or (unit == "MB" and size < 5), match.group(0)


def test_ranked_generate_and_metrics(container):
    url, _, _ = container
    response = generate(url, {"adapter": TINY_ADAPTER, "rank": 2}, max_tokens=4)
    assert response.status_code == 200, response.text
    assert response.json()["rank"] == 2
    assert metric_value(url, "matryoshka_requests_total", adapter=TINY_ADAPTER, rank="2", status="200") == 1


def test_c_kernels_built_with_openmp(container):
    """The image's compiler builds the engine's C kernels, with OpenMP, as the non-root server user."""
    _, env, _ = container
    logs = docker("logs", CONTAINER, env=env, check=False)
    text = logs.stdout + logs.stderr
    assert "built the fused CPU kernels" in text, text[-3000:]
    assert "fused CPU kernels unavailable" not in text and "-fopenmp" not in text, text[-3000:]


def test_healthcheck_script_and_non_root_pid1(container):
    _, env, _ = container
    assert docker("exec", CONTAINER, "python", "/opt/matryoshka/healthcheck.py", env=env, check=False).returncode == 0
    assert docker("exec", CONTAINER, "id", "-u", env=env).stdout.strip() == "10001"
    cmdline = docker("exec", CONTAINER, "cat", "/proc/1/cmdline", env=env).stdout.replace("\0", " ")
    assert "matryoshka-lora serve" in cmdline
    healthcheck = docker("inspect", "--format={{json .Config.Healthcheck.Test}}", CONTAINER, env=env).stdout
    assert "healthcheck.py" in healthcheck


def test_sigterm_drains_the_request_in_flight(container):
    """Runs last in this module: it stops the container."""
    url, env, _ = container
    result = {}
    body = {
        "adapter": TINY_ADAPTER,
        "rank": 8,
        "prompt": "Write a long story about a lighthouse keeper.",
        "ignore_eos": True,
    }
    worker = threading.Thread(target=lambda: result.update(response=generate(url, body, max_tokens=96, timeout_s=300)))
    worker.start()
    wait_until(
        lambda: (metric_value(url, "matryoshka_num_requests_running") or 0) >= 1, 60, "the request to be running"
    )
    started = time.monotonic()
    docker("kill", "--signal=SIGTERM", CONTAINER, env=env)
    worker.join(DRAIN_TIMEOUT_S + 30)
    response = result.get("response")
    assert response is not None and response.status_code == 200, getattr(response, "text", "no response")
    assert response.json()["finish_reason"] in ("length", "stop")
    exit_code = docker("wait", CONTAINER, env=env, timeout=DRAIN_TIMEOUT_S + 30).stdout.strip()
    assert exit_code == "0", f"exit code {exit_code} after {time.monotonic() - started:.0f} s"
