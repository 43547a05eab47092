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


def merge_results(specs: list[str]) -> dict:
    """One plottable result from several `eval --out` files: each spec is PATH, PATH#I (the file's I-th
    adapter) or either with =LABEL; the base accuracy and task are the first file's."""
    import json

    from matryoshka_lora.errors import ConfigError

    merged: dict | None = None
    for spec in specs:
        where, _, label = spec.partition("=")
        path, _, index = where.partition("#")
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError("result file", path, f"an `eval --out` JSON file ({exc})") from None
        adapters = result.get("adapters", [])
        if index and (not index.isdigit() or int(index) >= len(adapters)):
            raise ConfigError("adapter index", spec, f"0..{len(adapters) - 1}")
        chosen = [adapters[int(index)]] if index else adapters
        if merged is None:
            merged = {k: result[k] for k in ("task", "num_test", "base_accuracy")} | {"adapters": []}
        merged["adapters"] += [{**a, "name": label or a["name"]} for a in chosen]
    if merged is None:
        raise ConfigError("result files", specs, "one or more")
    return merged
