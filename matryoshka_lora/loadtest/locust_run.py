"""Run Locust headless in a subprocess (gevent's monkey-patching stays out of this process) and read
what it wrote: Locust's own per-name statistics, and the request records of locust_user.py.

    locust -f matryoshka_lora/loadtest/locust_user.py --headless -u USERS -r USERS -t DURATION
           --host URL --csv PREFIX --html PREFIX.html --json-file PREFIX_stats --only-summary --stop-timeout S

Locust rewrites its CSV files once a second and does not rewrite them at exit, so their last second
may be missing; `PREFIX_stats.json` is written at exit from the final statistics and is what is read.
The CSV and HTML files stay beside it for people.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from matryoshka_lora.errors import MatryoshkaError
from matryoshka_lora.loadtest.plan import PLAN_ENV, Plan, write_plan
from matryoshka_lora.loadtest.records import RequestRecord, read_records

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locust_user.py")  # never imported here: it would load gevent
STOP_TIMEOUT_S = 300  # users finish the request in flight when the run time is up (so counters match)


class LocustError(MatryoshkaError):
    """Locust exited abnormally; the message ends with its output's tail."""


@dataclass
class LocustRun:
    records: list[RequestRecord]
    stats: list[dict]  # Locust's final entries: {name, method (E2E/TTFT/TPOT/ITL), num_requests, ...}
    prefix: Path
    returncode: int

    def count(self, request_type: str) -> int:
        """Locust's request count of one type over every name."""
        return sum(int(e.get("num_requests", 0)) for e in self.stats if e.get("method") == request_type)


def read_stats_json(path: Path) -> list[dict]:
    """The entries of Locust's `--json-file` output (one per request type and name)."""
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))


def locust_command(url: str, users: int, duration_s: float, prefix: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{max(1, math.ceil(duration_s))}s",
        "--host",
        url,
        "--csv",
        str(prefix),
        "--html",
        f"{prefix}.html",
        "--json-file",
        f"{prefix}_stats",
        "--only-summary",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
    ]


def run_locust(url: str, plan: Plan, users: int, duration_s: float, prefix: Path) -> LocustRun:
    """One closed-loop run of `users` users for at most `duration_s` (and `plan.max_requests` requests);
    users finish their request in flight when the time is up."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    records_path = Path(f"{prefix}_records.jsonl")
    records_path.unlink(missing_ok=True)
    plan.records = str(records_path)
    plan_path = Path(f"{prefix}_plan.json")
    write_plan(plan_path, plan)
    cmd = locust_command(url, users, duration_s, prefix)
    log.info("locust: %d users, %.0f s, %s", users, duration_s, prefix.name)
    env = {**os.environ, PLAN_ENV: str(plan_path)}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration_s + STOP_TIMEOUT_S + 120)
    except subprocess.TimeoutExpired as exc:
        raise LocustError(f"locust did not finish within {exc.timeout:.0f} s") from None
    Path(f"{prefix}_locust.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise LocustError(f"locust exited with {proc.returncode}:\n{tail}")
    return LocustRun(read_records(records_path), read_stats_json(Path(f"{prefix}_stats.json")), prefix, proc.returncode)
