"""AURAC: the area under the rank-accuracy curve, normalised by the rank span (the paper's metric).

    x_i = log2(r_i)  (axis="log2")   or   r_i  (axis="linear")
    aurac = sum_i (x_{i+1} - x_i) * (acc_i + acc_{i+1}) / 2  /  (x_last - x_first)

i.e. the mean accuracy over the rank axis with trapezoids between the measured ranks; a single rank
returns its accuracy. With the log2 axis each doubling of the rank weighs the same.
"""

from __future__ import annotations

import math
from typing import Sequence

from matryoshka_lora.errors import ConfigError

AXES = ("log2", "linear")


def aurac(ranks: Sequence[int], accuracies: Sequence[float], axis: str = "log2") -> float:
    """Area under the accuracy-vs-rank curve divided by the rank span (see the module docstring)."""
    if axis not in AXES:
        raise ConfigError("aurac axis", axis, list(AXES))
    ranks, accuracies = list(ranks), list(accuracies)
    if not ranks:
        raise ConfigError("aurac ranks", ranks, "at least one rank")
    if len(ranks) != len(accuracies):
        raise ConfigError("number of accuracies", len(accuracies), f"one per rank ({len(ranks)})")
    if any(not isinstance(r, (int, float)) or isinstance(r, bool) or r < 1 for r in ranks):
        raise ConfigError("aurac ranks", ranks, "ranks >= 1")
    if any(b <= a for a, b in zip(ranks, ranks[1:])):
        raise ConfigError("aurac ranks", ranks, "strictly increasing ranks (sorted, no duplicates)")
    if any(not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) for a in accuracies):
        raise ConfigError("aurac accuracies", accuracies, "finite numbers")
    if len(ranks) == 1:
        return float(accuracies[0])
    xs = [math.log2(r) for r in ranks] if axis == "log2" else [float(r) for r in ranks]
    area = sum((x1 - x0) * (a0 + a1) / 2 for x0, x1, a0, a1 in zip(xs, xs[1:], accuracies, accuracies[1:]))
    return area / (xs[-1] - xs[0])
