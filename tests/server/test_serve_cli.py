"""`matryoshka-lora serve` as a real process: SIGTERM drains the request in flight, then exits 0."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from typer.testing import CliRunner

from matryoshka_lora.cli import app as cli_app
from matryoshka_lora.errors import ConfigError

from .helpers import sse_data


def test_sigterm_drains_the_request_in_flight(tiny_model_dir, tiny_adapters, tmp_path):
    from matryoshka_lora.loadtest.server import ServerProcess

    args = ["--model", str(tiny_model_dir), "--adapters", str(tiny_adapters["dir"]), "--num-threads", "1"]
    args += ["--drain-timeout", "60", "--max-output-tokens", "200", "--no-access-log"]
    with ServerProcess(args, tmp_path / "serve.log", ready_timeout_s=120) as server:
        body = {"prompt": "tell me a story", "adapter": "alpha", "rank": 8, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert json.loads(next(lines)[len("data: ") :])["type"] == "start"
            server.proc.send_signal(signal.SIGTERM)
            events = [json.loads(d) for d in sse_data(lines)]
        assert r.status_code == 200
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] in ("stop", "length")
        assert server.proc.wait(timeout=60) == 0
        log = server.log_path.read_text()
        assert "draining" in log and "engine stopped" in log
        assert "POST /generate" not in log  # --no-access-log


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
