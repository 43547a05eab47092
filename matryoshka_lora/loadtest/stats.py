"""Statistics of a set of request records: exact percentiles (not Locust's rounded ones), rates.

window      = last end - first start                     (wall clock of the records)
output_tok_s = sum(output tokens of 200s) / window;  req_s = number of 200s / window
ttft / tpot / itl / e2e: p50, p90, p95, p99 and mean over the 200s (itl: over every gap)
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Iterable

import numpy as np

from matryoshka_lora.loadtest.records import RequestRecord

PERCENTILES = (50, 90, 95, 99)


def percentiles(values: Iterable[float], pcts: tuple[int, ...] = PERCENTILES) -> dict[str, float | None]:
    """{"p50": ..., ..., "mean": ...} (linear interpolation); None values when there is no value."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {**{f"p{p}": None for p in pcts}, "mean": None}
    out = {f"p{p}": float(np.percentile(arr, p)) for p in pcts}
    out["mean"] = float(arr.mean())
    return out


def window_s(records: list[RequestRecord]) -> float:
    """Wall clock from the first request sent to the last one ended."""
    ended = [r.start + (r.e2e_s or 0.0) for r in records]
    return max(ended) - min(r.start for r in records) if records else 0.0


def summarize(records: list[RequestRecord], wall_s: float | None = None) -> dict:
    """Counts, rates and latency percentiles of `records` (rates over `wall_s`, default their window)."""
    ok = [r for r in records if r.ok]
    wall = window_s(records) if wall_s is None else wall_s
    num_tokens = sum(r.num_output_tokens for r in ok)
    ranks = [r.rank for r in ok if r.rank is not None]
    return {
        "num_requests": len(records),
        "num_ok": len(ok),
        "statuses": {str(k): v for k, v in sorted(Counter(r.status for r in records).items())},
        "wall_s": wall,
        "output_tokens": num_tokens,
        "output_tok_s": num_tokens / wall if wall > 0 else None,
        "req_s": len(ok) / wall if wall > 0 else None,
        "mean_rank": statistics.fmean(ranks) if ranks else None,
        "ttft_s": percentiles(r.ttft_s for r in ok),
        "tpot_s": percentiles(r.tpot_s for r in ok),
        "itl_s": percentiles(gap for r in ok for gap in r.itl_s),
        "e2e_s": percentiles(r.e2e_s for r in ok),
    }


def by_label(records: list[RequestRecord], wall_s: float | None = None) -> dict[str, dict]:
    """summarize() per `ADAPTER@RANK` label (served rank), rates over the whole set's window."""
    wall = window_s(records) if wall_s is None else wall_s
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(r.label, []).append(r)
    return {label: summarize(group, wall) for label, group in sorted(groups.items())}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def row_of(summary: dict, pcts: tuple[int, ...] = (50, 90, 99), **labels) -> dict:
    """A flat table row: `labels`, then ttft/tpot/itl/e2e percentiles in ms, tokens/s, requests/s."""
    row = dict(labels)
    row["num_ok"] = summary["num_ok"]
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for p in pcts:
            row[f"{metric}_p{p}_ms"] = ms(summary[f"{metric}_s"][f"p{p}"])
    row["output_tok_s"] = None if summary["output_tok_s"] is None else round(summary["output_tok_s"], 2)
    row["req_s"] = None if summary["req_s"] is None else round(summary["req_s"], 3)
    return row
