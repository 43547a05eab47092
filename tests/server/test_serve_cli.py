"""`matryoshka-lora serve` as a real process: SIGTERM drains the request in flight, then exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from matryoshka_lora.cli import app as cli_app
from matryoshka_lora.errors import ConfigError

from .helpers import sse_data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "matryoshka_lora.cli", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("serve not ready in time")


def test_sigterm_drains_the_request_in_flight(tiny_model_dir, tiny_adapters):
    port = free_port()
    proc = start_serve(
        "--model",
        str(tiny_model_dir),
        "--adapters",
        str(tiny_adapters["dir"]),
        "--port",
        str(port),
        "--num-threads",
        "1",
        "--drain-timeout",
        "60",
        "--max-output-tokens",
        "200",
        "--no-access-log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        body = {"prompt": "tell me a story", "adapter": "alpha", "rank": 8, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines)[len("data: ") :])["type"] == "start"
            proc.send_signal(signal.SIGTERM)
            events = [json.loads(d) for d in sse_data(lines)]
        assert r.status_code == 200
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] in ("stop", "length")
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read()
        assert "draining" in log and "engine stopped" in log
        assert "POST /generate" not in log  # --no-access-log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--host", "0.0.0.0"], "host without a tenants file"),
        (["--backend", "tgi"], "backend"),
        (["--budget-unmet", "later"], "budget_unmet"),
        (["--port", "-1"], "port"),
    ],
)
def test_bad_flags_are_config_errors(args, needle, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli_app, ["serve", *args])
    assert isinstance(result.exception, ConfigError) and needle in str(result.exception)


def test_hash_key_prints_the_sha256_of_stdin():
    result = CliRunner().invoke(cli_app, ["serve", "--hash-key"], input="secret\n")
    assert result.exit_code == 0
    assert result.output.strip() == "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
