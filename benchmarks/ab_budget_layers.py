"""A/B of the budget controller's optional layers: what the typical-margin refusals and the headroom rule buy.

Runs `matryoshka-lora loadtest budget --budget-unmet refuse` once per variant per repeat, the variants
interleaved (all, then each in turn, `--repeats` times) so that the VM's drift falls on every variant
alike. Every run starts its own server with the same random adapters, the same fixed budget and the
same offered rates (a fixed budget, unlike the scenario's default of 3 x the unloaded latency, so that
the runs compare the controllers, not their probes). A variant switches layers off with
`MATRYOSHKA_BUDGET_LAYERS_OFF` (EngineConfig.budget_layers_off):

    all          every layer
    no-typical   a refusal is decided on the margin's prediction instead of the typical (median) one
    no-headroom  the highest rank that fits, whatever it leaves a next request (no `leaves_headroom`)

Per variant and rate step it prints the mean and the range over repeats of: hit rate (answered 200
within the budget, over all requests offered: refused ones count as misses), refused share, and the
hit rate of the requests served at a rank predicted to fit.

    .venv/bin/python benchmarks/ab_budget_layers.py --out runs/ab-budget              # ~2.5 min per run, 6 runs
    .venv/bin/python benchmarks/ab_budget_layers.py --repeats 1 --variants all,no-typical
    .venv/bin/python benchmarks/ab_budget_layers.py --variants all,no-headroom --budget-ms 1300 --rates 3.1,4.7

Each run's loadtest output stays under OUT/VARIANT-REPEAT; OUT/summary.json holds every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("ab_budget_layers")

VARIANTS = {"all": "", "no-typical": "typical", "no-headroom": "headroom"}
METRICS = ("hit_rate", "refused_share", "hit_rate_when_predicted")


def run_once(out: Path, layers_off: str, args) -> list[dict]:
    cmd = [
        sys.executable, "-m", "matryoshka_lora.cli", "loadtest", "budget",
        "--budget-unmet", "refuse", "--budget-ms", str(args.budget_ms), "--rates", args.rates,
        "--duration", str(args.duration), "--seed", str(args.seed), "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "MATRYOSHKA_BUDGET_LAYERS_OFF": layers_off}
    log.info("%s: %s", out.name, " ".join(cmd[3:]))
    done = subprocess.run(cmd, env=env, check=False)
    result = json.loads((out / "result.json").read_text())
    if done.returncode not in (0, 1):  # 1: a goal missed, which is data here
        raise SystemExit(f"{out}: loadtest exited {done.returncode}")
    return result["tables"]["budget steps"]


def summarize(runs: dict[str, list[list[dict]]]) -> str:
    lines = ["| variant | offered req/s | " + " | ".join(METRICS) + " | runs |", "|---" * (len(METRICS) + 3) + "|"]
    for variant, repeats in runs.items():
        for step in range(len(repeats[0])):
            cells = []
            for metric in METRICS:
                values = [rows[step][metric] for rows in repeats if rows[step][metric] is not None]
                if not values:
                    cells.append("–")
                    continue
                mean = 100 * statistics.fmean(values)
                cells.append(f"{mean:.0f} % ({100 * min(values):.0f}-{100 * max(values):.0f})")
            rate = repeats[0][step]["offered_rps"]
            lines.append(f"| {variant} | {rate} | " + " | ".join(cells) + f" | {len(repeats)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ab-budget"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-ms", type=float, default=10000.0)
    parser.add_argument(
        "--rates",
        default="4.8,6.4,8.0",
        help="req/s: about 0.75, 1 and 1.25 x rank-1 capacity (Intel AMX VM, gguf+bf16)",
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per rate step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    runs: dict[str, list[list[dict]]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            runs[variant].append(run_once(args.out / f"{variant}-{repeat}", VARIANTS[variant], args))
            (args.out / "summary.json").write_text(json.dumps(runs, indent=1))
    table = summarize(runs)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
