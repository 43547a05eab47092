"""PNG plots of a load-test report (matplotlib, Agg backend). Each function takes table rows (dicts as
the scenarios build them) and a path, draws one figure, and returns the path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _values(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    pairs = [(r[x], r[y]) for r in rows if r.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def rank_latency(rows: list[dict], path: Path) -> Path:
    """TTFT, TPOT and e2e against rank (log2 axis): p50 solid, p99 dashed, one colour per concurrency."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, metric, title in zip(
        axes,
        ("ttft", "tpot", "e2e"),
        ("time to first token", "time per output token", "end-to-end latency"),
        strict=True,
    ):
        for i, users in enumerate(sorted({r["users"] for r in rows})):
            group = sorted((r for r in rows if r["users"] == users), key=lambda r: r["rank"])
            color = f"C{i}"
            xs, ys = _values(group, "rank", f"{metric}_p50_ms")
            ax.plot(xs, ys, "o-", color=color, label=f"{users} users p50")
            xs, ys = _values(group, "rank", f"{metric}_p99_ms")
            ax.plot(xs, ys, "s--", color=color, alpha=0.7, label=f"{users} users p99")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def throughput_vs_concurrency(rows: list[dict], path: Path) -> Path:
    """Output tokens/s against concurrent users, one line per rank."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for rank in sorted({r["rank"] for r in rows}):
        group = sorted((r for r in rows if r["rank"] == rank), key=lambda r: r["users"])
        xs, ys = _values(group, "users", "output_tok_s")
        ax.plot(xs, ys, "o-", label=f"rank {rank}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent users")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def budget_vs_load(rows: list[dict], path: Path) -> Path:
    """Mean served rank (left) and p95 latency with the budget (right) against offered load."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    xs, ys = _values(rows, "offered_rps", "mean_rank")
    ax.plot(xs, ys, "o-", color="C0", label="mean served rank")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("mean served rank", color="C0")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    xs, ys = _values(rows, "offered_rps", "e2e_p95_ms")
    right.plot(xs, ys, "s-", color="C3", label="p95 latency")
    xs, ys = _values(rows, "offered_rps", "budget_ms")
    right.plot(xs, ys, ":", color="k", label="budget")
    right.set_ylabel("ms", color="C3")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center left", fontsize=8)
    ax.set_title("latency budget -> rank under load")
    return _save(fig, path)


def mixed_vs_alone(rows: list[dict], path: Path) -> Path:
    """Per rank: TPOT and e2e p50 inside the mix vs alone (bars)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ranks = [r["rank"] for r in rows]
    pos = range(len(ranks))
    for ax, metric in zip(axes, ("tpot", "e2e"), strict=True):
        alone = [r[f"{metric}_p50_alone_ms"] or 0 for r in rows]
        mixed = [r[f"{metric}_p50_mix_ms"] or 0 for r in rows]
        ax.bar([p - 0.2 for p in pos], alone, width=0.4, label="alone")
        ax.bar([p + 0.2 for p in pos], mixed, width=0.4, label="in the mix")
        ax.set_xticks(list(pos), [str(r) for r in ranks])
        ax.set_xlabel("rank")
        ax.set_ylabel(f"{metric} p50 (ms)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    return _save(fig, path)


def peers_bars(rows: list[dict], path: Path) -> Path:
    """Output tokens/s of this server and each peer (horizontal bars)."""
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    names = [r["system"] for r in rows]
    ax.barh(names, [r["output_tok_s"] or 0 for r in rows], color=["C2" if r.get("ours") else "C7" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("output tokens/s")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def rss_over_time(times_s: list[float], rss_mb: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot(times_s, rss_mb, "-")
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("soak: server memory")
    ax.grid(alpha=0.3)
    return _save(fig, path)
