"""Live helpers for the deploy tests: a real `matryoshka-lora serve` on a tiny random model with a
tiny random adapter, a real Prometheus scraping it, and traffic.

Every process starts on a free loopback port inside the test and is stopped by it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import httpx
import pytest
import yaml

T = TypeVar("T")

TINY_ADAPTER = "tiny"
TINY_RANKS = (1, 2, 4, 8)
MIXED_TRAFFIC = (  # one wave: every rank of the tiny adapter, the base model, budgets, an unknown adapter
    {"adapter": TINY_ADAPTER, "rank": 1},
    {"adapter": TINY_ADAPTER, "rank": 1},
    {"adapter": TINY_ADAPTER, "rank": 2},
    {"adapter": TINY_ADAPTER, "rank": 4},
    {"adapter": TINY_ADAPTER, "rank": 8},
    {},
    {"adapter": TINY_ADAPTER, "latency_budget_ms": 60_000},
    {"adapter": TINY_ADAPTER, "latency_budget_ms": 1},
    {"adapter": "no-such-adapter", "rank": 1},
)


def require_server() -> None:
    """Skip with the reason while the HTTP server or the adapter store has not landed."""
    for module in ("matryoshka_lora.server.app", "matryoshka_lora.adapters.store"):
        try:
            __import__(module)
        except ImportError as exc:
            pytest.skip(f"{module} is not importable yet ({exc}); this test runs once the server lands")


def wait_until(
    probe: Callable[[], T | None],
    timeout_s: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    interval_s: float = 0.25,
) -> T:
    """Call `probe` until it returns a truthy value; fail after `timeout_s` or when `proc` has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) while waiting for {what}\n{tail(log)}")
        try:
            value = probe()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail(log)}")


def tail(path: Path | None, num_lines: int = 40) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])


def write_tiny_adapter(model_dir: Path, out_dir: Path, name: str = TINY_ADAPTER, r_max: int = 8) -> Path:
    """A random Matryoshka adapter (non-zero B, so ranks differ) on q_proj/v_proj of the model in `model_dir`."""
    from matryoshka_lora.adapters.random_adapter import save_random_adapter
    from matryoshka_lora.models import load_base_model

    model, _ = load_base_model(model_dir)
    targets = ("q_proj", "v_proj")
    return save_random_adapter(
        model, out_dir / name, name, r_max, target_modules=targets, std=0.1, train_ranks=TINY_RANKS
    )


def start_prometheus(
    prometheus: str, target: str, port: int, work_dir: Path, rule_files: list[Path]
) -> subprocess.Popen:
    """A real Prometheus on 127.0.0.1:port scraping `target` every second, evaluating `rule_files`."""
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": "matryoshka-lora", "static_configs": [{"targets": [target]}]}],
    }
    config_file = work_dir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    log = work_dir / "prometheus.log"
    args = [
        prometheus,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={work_dir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGTERM, then SIGKILL if it has not exited after `timeout_s`; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def generate(base_url: str, body: dict, max_tokens: int = 6, timeout_s: float = 120) -> httpx.Response:
    payload = {"prompt": "Tell me a story about a cat.", "max_tokens": max_tokens, **body}
    return httpx.post(f"{base_url}/generate", json=payload, timeout=timeout_s)


def send_wave(base_url: str, wave=MIXED_TRAFFIC, concurrency: int = 4) -> list[int]:
    """Send one wave of requests, `concurrency` at a time; returns the status codes in wave order."""
    with ThreadPoolExecutor(concurrency) as pool:
        return [response.status_code for response in pool.map(lambda body: generate(base_url, body), wave)]


def prom_query(prom_url: str, expr: str) -> list[dict]:
    """Instant query through Prometheus's HTTP API: the result vector."""
    response = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=30)
    body = response.json()
    if body.get("status") != "success":
        raise AssertionError(f"query failed: {expr}\n{body}")
    return body["data"]["result"]


def prom_scalar(prom_url: str, expr: str) -> float | None:
    result = prom_query(prom_url, expr)
    return float(result[0]["value"][1]) if result else None


def metric_value(base_url: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the server's /metrics (parsed by prometheus_client), None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return None
