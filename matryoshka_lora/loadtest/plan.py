"""The plan a Locust subprocess runs: which requests its users send, how many, where records go.

It crosses the process boundary as a JSON file named by $MATRYOSHKA_LOADTEST_PLAN. This module must
not import Locust: importing Locust monkey-patches the importing process with gevent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLAN_ENV = "MATRYOSHKA_LOADTEST_PLAN"


@dataclass
class Plan:
    """mix: [{adapter, rank, latency_budget_ms, weight}] drawn per request; the rest: the request body
    (`extra` is merged into it), the bound on requests, the records file, the API key, the RNG seed."""

    mix: list[dict]
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = False
    max_requests: int = 1_000_000
    records: str | None = None
    api_key: str | None = None
    seed: int = 0
    tag: str = ""
    extra: dict = field(default_factory=dict)

    def body(self, entry: dict) -> dict:
        """The JSON body of a streamed `POST /generate` for one mix entry."""
        body = {
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            **self.extra,
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        for key in ("adapter", "rank", "latency_budget_ms"):
            if entry.get(key) is not None:
                body[key] = entry[key]
        return body


def write_plan(path: Path, plan: Plan) -> None:
    Path(path).write_text(json.dumps(asdict(plan)), encoding="utf-8")


def read_plan(path: Path) -> Plan:
    return Plan(**json.loads(Path(path).read_text(encoding="utf-8")))


def parse_mix(text: str) -> list[dict]:
    """ "alpha@1,alpha@8,beta@budget=500,base" -> mix entries (equal weights); `ADAPTER*W` sets a weight:
    "alpha@1*3,alpha@64" sends rank 1 three times as often."""
    from matryoshka_lora.errors import ConfigError

    entries = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        spec, _, weight = part.partition("*")
        name, _, tail = spec.partition("@")
        entry: dict = {"adapter": None if name == "base" else name, "rank": None, "latency_budget_ms": None}
        try:
            if tail.startswith("budget="):
                entry["latency_budget_ms"] = float(tail[len("budget=") :])
            elif tail:
                entry["rank"] = int(tail)
            entry["weight"] = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(
                "--mix entry", part, "ADAPTER, ADAPTER@RANK or ADAPTER@budget=MS, optionally *WEIGHT"
            ) from None
        if not name or (entry["adapter"] is None and tail) or entry["weight"] <= 0:
            raise ConfigError(
                "--mix entry",
                part,
                "ADAPTER, ADAPTER@RANK or ADAPTER@budget=MS (base: no rank), optionally *WEIGHT > 0",
            )
        entries.append(entry)
    if not entries:
        raise ConfigError("--mix", text, "one or more entries, e.g. alpha@1,alpha@8")
    return entries
