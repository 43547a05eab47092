"""Rank–accuracy curves of one or more adapters on one PNG (matplotlib, Agg backend, log2 rank axis)."""

from __future__ import annotations

from pathlib import Path


def plot_rank_curves(result: dict, out: str | Path, title: str | None = None) -> Path:
    """Draw accuracy vs rank for every adapter of an `evaluate.evaluate` result, and the base accuracy
    as a dashed line; write a small PNG to `out` and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    all_ranks: set[int] = set()
    for entry in result["adapters"]:
        ranks = [int(r) for r in entry["ranks"]]
        all_ranks.update(ranks)
        accs = [100 * entry["accuracy"][str(r)] for r in ranks]
        label = f"{entry['name']} (AURAC {100 * entry['aurac_log2']:.1f})"
        ax.plot(ranks, accs, marker="o", label=label)
    ax.axhline(
        100 * result["base_accuracy"],
        color="gray",
        linestyle="--",
        label=f"base model ({100 * result['base_accuracy']:.1f})",
    )
    ax.set_xscale("log", base=2)
    if all_ranks:
        ax.set_xticks(sorted(all_ranks), [str(r) for r in sorted(all_ranks)])
    ax.set_xlabel("inference rank r (log2 axis)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title or f"{result['task']}: accuracy per rank ({result['num_test']} test examples)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
