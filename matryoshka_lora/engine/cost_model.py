"""Latency budget -> rank: a per-step cost model, fitted at warm-up and corrected online.

    step_time = a + b * num_tokens + c * lora_work + d * num_segments + e * attn_work + f * num_sampled
        lora_work  = sum over LoRA segments of (segment tokens * rank)
        attn_work  = sum over the step's tokens of the context length they attend to
Coefficients come from non-negative least squares on warm-up steps; afterwards every observed step
updates a correction factor (EMA of observed / predicted) that multiplies all predictions.

A request's end-to-end latency at rank r under the current load is predicted as
    queue wait  (waves of max_num_seqs ahead of it x decode steps of the running set)
  + prefill     (its prompt in chunks, each alongside the running set's decode tokens)
  + decode      (max_tokens - 1 steps of the running set plus it, contexts growing)
and `choose_rank` serves the highest candidate rank predicted to meet the budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

FEATURES = ("const", "num_tokens", "lora_work", "num_segments", "attn_work", "num_sampled")


@dataclass(frozen=True)
class StepFeatures:
    num_tokens: int
    lora_work: int
    num_segments: int
    attn_work: int
    num_sampled: int

    def vector(self) -> np.ndarray:
        return np.array([1.0, self.num_tokens, self.lora_work, self.num_segments, self.attn_work, self.num_sampled])


@dataclass(frozen=True)
class LoadSnapshot:
    """What the engine is doing when a budgeted request arrives."""

    num_running: int
    num_waiting: int
    max_num_seqs: int
    lora_work: int  # sum of ranks of the running decoders (1 token each per step)
    num_segments: int  # distinct (adapter, rank) groups running
    context_sum: int  # sum of the running sequences' current lengths
    mean_remaining: float  # mean output tokens the running sequences still have to produce
    max_num_batched_tokens: int


def nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (active set: drop negative ones and refit)."""
    active = np.ones(x.shape[1], dtype=bool)
    coef = np.zeros(x.shape[1])
    while active.any():
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            break
        idx = np.flatnonzero(active)
        active[idx[np.argmin(sol)]] = False
    return coef


class CostModel:
    def __init__(self, coef: np.ndarray | None = None, ema: float = 0.1):
        # An uncalibrated default (seconds) so that predictions exist before warm-up.
        self.coef = coef if coef is not None else np.array([5e-3, 5e-4, 1e-7, 2e-4, 1e-7, 5e-4])
        self.correction = 1.0
        self.ema = ema

    def fit(self, samples: list[tuple[StepFeatures, float]]) -> None:
        x = np.stack([f.vector() for f, _ in samples])
        y = np.array([t for _, t in samples])
        self.coef = nnls(x, y)
        self.correction = 1.0
        log.info("cost model: %s", ", ".join(f"{n}={c:.3g}" for n, c in zip(FEATURES, self.coef)))

    def predict_step(self, f: StepFeatures) -> float:
        return float(f.vector() @ self.coef) * self.correction

    def observe(self, f: StepFeatures, seconds: float) -> None:
        """Online correction: correction <- (1 - ema) * correction + ema * observed / raw prediction."""
        raw = float(f.vector() @ self.coef)
        if raw > 0 and seconds > 0:
            self.correction = (1 - self.ema) * self.correction + self.ema * (seconds / raw)

    def predict_latency(self, load: LoadSnapshot, num_prompt_tokens: int, max_tokens: int, rank: int) -> float:
        """Predicted seconds from enqueue to the last token for a new request at `rank` (0 = base)."""
        n = load.num_running
        decode_step = StepFeatures(n, load.lora_work, load.num_segments, load.context_sum, n)
        free = load.max_num_seqs - load.num_running
        ahead = load.num_waiting + 1 - free
        queue = 0.0
        if ahead > 0:
            waves = math.ceil(ahead / load.max_num_seqs)
            queue = waves * max(load.mean_remaining, 1.0) * self.predict_step(decode_step)
        new_segment = 1 if rank > 0 else 0
        prefill, left = 0.0, num_prompt_tokens
        while left > 0:
            chunk = min(left, max(load.max_num_batched_tokens - n, 1))
            done = num_prompt_tokens - left
            prefill += self.predict_step(StepFeatures(
                n + chunk, load.lora_work + chunk * rank, load.num_segments + new_segment,
                load.context_sum + chunk * (done + chunk), n + (1 if left == chunk else 0),
            ))
            left -= chunk
        steps = max(max_tokens - 1, 0)
        # contexts grow by one token per sequence per step: use the mean context over the decode
        mean_ctx = load.context_sum + n * steps / 2 + num_prompt_tokens + steps / 2
        decode = steps * self.predict_step(StepFeatures(
            n + 1, load.lora_work + rank, load.num_segments + new_segment, int(mean_ctx), n + 1,
        ))
        return queue + prefill + decode

    def choose_rank(
        self, load: LoadSnapshot, num_prompt_tokens: int, max_tokens: int, candidates: list[int], budget_s: float
    ) -> tuple[int, bool, float]:
        """(rank, met, predicted seconds): the highest candidate predicted within budget, else the lowest."""
        ranks = sorted(set(candidates))
        predictions = {r: self.predict_latency(load, num_prompt_tokens, max_tokens, r) for r in ranks}
        meeting = [r for r in ranks if predictions[r] <= budget_s]
        if meeting:
            return meeting[-1], True, predictions[meeting[-1]]
        return ranks[0], False, predictions[ranks[0]]
