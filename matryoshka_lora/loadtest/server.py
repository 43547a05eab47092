"""The server under test: `matryoshka-lora serve` started as a subprocess on a free 127.0.0.1 port.

    with ServerProcess(args, log_path) as server:   # returns once GET /ready answers 200
        server.url, server.pid, server.rss_bytes()
    # SIGTERM (the server drains), then SIGKILL if it has not exited within `stop_timeout_s`;
    # the server runs in its own process group, and what is left of that group is killed after it

A subclass names another command and readiness path (loadtest/vllm_serve.py: vLLM's OpenAI server).

Or `None` of it: `--url` points the load test at a server someone else runs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from matryoshka_lora.errors import MatryoshkaError

log = logging.getLogger(__name__)


class ServerStartError(MatryoshkaError):
    """The server exited, or did not become ready in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(
    model: str | None,
    adapters: list[Path],
    num_threads: int | None = None,
    max_num_seqs: int = 32,
    max_queue_len: int | None = None,
    tenants: Path | None = None,
    max_output_tokens: int = 4096,
    budget_unmet: str | None = None,
) -> list[str]:
    """The `serve` flags of a load-test server (host and port are added by ServerProcess)."""
    args = ["--max-num-seqs", str(max_num_seqs), "--max-output-tokens", str(max_output_tokens)]
    if model is not None:
        args += ["--model", str(model)]
    for path in adapters:
        args += ["--adapters", str(path)]
    if num_threads is not None:
        args += ["--num-threads", str(num_threads)]
    if max_queue_len is not None:
        args += ["--max-queue-len", str(max_queue_len)]
    if tenants is not None:
        args += ["--tenants", str(tenants)]
    if budget_unmet is not None:
        args += ["--budget-unmet", budget_unmet]
    return args


def wait_ready(url: str, timeout_s: float, alive=lambda: True, path: str = "/ready") -> None:
    """Poll GET `path` until 200; ServerStartError when `alive()` turns False or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise ServerStartError("the server exited during startup")
        try:
            if httpx.get(f"{url}{path}", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise ServerStartError(f"the server at {url} was not ready within {timeout_s:.0f} s")


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (Linux /proc), None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class ServerProcess:
    """A `matryoshka-lora serve` subprocess; its stdout+stderr go to `log_path`."""

    ready_path = "/ready"

    def __init__(self, args: list[str], log_path: Path, ready_timeout_s: float = 600.0, stop_timeout_s: float = 60.0):
        self.args, self.log_path = list(args), Path(log_path)
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._stopped = False  # its process group is killed once only (the group id may be reused later)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int | None:
        return rss_bytes(self.proc.pid) if self.proc is not None else None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "matryoshka_lora.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]

    def environ(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}

    def start(self) -> "ServerProcess":
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting the server: %s", " ".join(cmd))
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                cmd, stdout=log_file, stderr=subprocess.STDOUT, env=self.environ(), start_new_session=True
            )
        try:
            wait_ready(self.url, self.ready_timeout_s, alive=lambda: self.proc.poll() is None, path=self.ready_path)
        except ServerStartError as exc:
            self.stop()
            raise ServerStartError(f"{exc}; log {self.log_path}:\n{self.log_tail()}") from None
        log.info("server ready at %s (pid %d)", self.url, self.proc.pid)
        return self

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM and wait (the server drains); SIGKILL after `stop_timeout_s`; then whatever is left of
        its process group (workers it started). Returns the exit code."""
        if self.proc is None or self._stopped:
            return None if self.proc is None else self.proc.returncode
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the server did not stop within %.0f s; killing it", self.stop_timeout_s)
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
