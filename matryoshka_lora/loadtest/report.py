"""The report of a run: OUT/result.json (everything, machine-readable) and OUT/report.md (the summary:
checks, goals, tables, plots, phases), beside the PNG plots, the records and Locust's CSV/HTML."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from matryoshka_lora.loadtest.phases import RunContext, ScenarioResult


def machine_info() -> dict:
    """What the numbers depend on: CPU, cores this process may use, memory, load, versions, commit."""
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "num_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_gib": mem_gib and round(mem_gib, 1),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": commit,
    }


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":")).replace("|", "\\|")
    return str(value).replace("|", "\\|")


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "_(no rows)_\n"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mark(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def invariant_summary(checks) -> list[dict]:
    """One row per kind of check (the phase suffix of "counters match (phase)" dropped): how many held."""
    counts: dict[str, list[int]] = {}
    for c in checks:
        name = c.name.split(" (", 1)[0]
        counts.setdefault(name, [0, 0])[0 if c.passed else 1] += 1
    return [{"check": name, "held in phases": ok, "failed": bad} for name, (ok, bad) in counts.items()]


def to_json(ctx: RunContext, result: ScenarioResult, info: dict) -> dict:
    cfg = ctx.config
    return {
        "scenario": result.scenario,
        "passed": result.passed,
        **info,
        "config": {
            k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "adapters" else v)
            for k, v in asdict(cfg).items()
        },
        "url": ctx.url,
        "workload": asdict(ctx.workload),
        "prompt": ctx.prompt,
        "adapters": [asdict(a) for a in ctx.adapters],
        "checks": [asdict(c) for c in result.checks],
        "tables": result.tables,
        "phases": [p.to_json() for p in result.phases],
        "plots": [str(p) for p in result.plots],
        "notes": ctx.notes + result.notes,
    }


def to_markdown(data: dict, result: ScenarioResult, out: Path) -> str:
    m, w = data["machine"], data["workload"]
    parts = [
        f"# Load test `{data['scenario']}`: {'all invariants hold' if data['passed'] else 'INVARIANTS FAILED'}\n",
        f"- command: `{data['command']}`",
        f"- started {data['started']}, took {data['elapsed_s']:.0f} s; server {data['url']}",
        f"- workload: {w['prompt_tokens']} prompt tokens, {w['output_tokens']} output tokens, temperature "
        f"{w['temperature']}, ignore_eos {w['ignore_eos']}",
        "- adapters: " + ", ".join(f"{a['name']} (r_max {a['r_max']})" for a in data["adapters"]),
        f"- machine: {m['cpu']} x {m['num_cpus']} CPUs, {m['mem_gib']} GiB, load average at start "
        f"{m['loadavg'][0]:.2f} (end {data['machine_end']['loadavg'][0]:.2f}), torch {m['torch']}, "
        f"commit {m['commit'] or '?'}\n",
    ]
    invariants = [(p.name, c) for p in result.phases for c in p.checks] + [
        ("", c) for c in result.checks if c.kind == "invariant"
    ]
    goals = [c for c in result.checks if c.kind == "goal"]
    if goals:
        parts.append(
            "## Goals\n\n" + md_table([{"goal": c.name, "result": mark(c.passed), "detail": c.detail} for c in goals])
        )
    for name, rows in result.tables.items():
        parts.append(f"## {name[0].upper()}{name[1:]}\n\n" + md_table(rows))
    if result.plots:
        parts.append("## Plots\n\n" + "\n".join(f"![{p.stem}]({p.relative_to(out)})" for p in result.plots) + "\n")
    failed = [(phase, c) for phase, c in invariants if c.passed is not True]
    parts.append(
        f"## Invariants: {len(invariants) - len(failed)} of {len(invariants)} hold\n\n"
        + (
            md_table(
                [{"phase": phase, "check": c.name, "result": mark(c.passed), "detail": c.detail} for phase, c in failed]
            )
            if failed
            else md_table(invariant_summary([c for _, c in invariants]))
        )
    )
    parts.append(
        "## Phases\n\n"
        + md_table(
            [
                {
                    "phase": p.name,
                    "requests": p.summary["num_requests"],
                    "statuses": p.summary["statuses"],
                    "output_tok_s": p.summary["output_tok_s"],
                    "records": Path(p.records_path).relative_to(out),
                    "locust": Path(p.extra["locust_html"]).relative_to(out) if "locust_html" in p.extra else None,
                }
                for p in result.phases
            ]
        )
    )
    if data["notes"]:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in data["notes"]) + "\n")
    return "\n".join(parts)


def write_report(ctx: RunContext, result: ScenarioResult, info: dict) -> tuple[Path, Path]:
    """Write OUT/result.json and OUT/report.md; `info` holds command, started, elapsed_s, machine(_end)."""
    data = to_json(ctx, result, info)
    json_path, md_path = ctx.out / "result.json", ctx.out / "report.md"
    json_path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    md_path.write_text(to_markdown(data, result, ctx.out), encoding="utf-8")
    return json_path, md_path


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
