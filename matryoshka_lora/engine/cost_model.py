"""Latency budget -> rank: a per-step cost model, fitted at warm-up and refitted from observed steps.

    step_time = a + b * num_tokens + c * lora_flops + d * lora_reads + e * num_groups
                  + f * attn_work + g * num_sampled
        lora_flops = sum over the step's LoRA groups of (group rows * group rank)    the op's matmuls
        lora_reads = sum over the groups of the group rank              weights read, once per group
        num_groups = LoRA groups (lora_batch.build_groups): dispatches of the op
        attn_work  = sum over the step's tokens of the context length they attend to
Coefficients come from non-negative least squares on the warm-up steps (the median of repeats per
case). Every observed step then goes into a window of recent steps, and the model is refitted on
warm-up + recent steps every `refit_every` observations; between refits a correction factor (EMA of
observed / predicted) follows drift quickly.

A request's end-to-end latency at rank r of adapter slot a, under the current load, is predicted as
    queue wait  (waves of max_num_seqs ahead of it x decode steps of the active set)
  + prefill     (the active set's pending prompt tokens, then its own, in chunks alongside the decode
                 tokens of the running sequences)
  + decode      (max_tokens - 1 steps of the active set plus it, contexts growing)
where the active set is the running sequences plus the waiting ones that free slots admit first.
Requests arriving during this one's life are counted from two arrival rates (arrivals.py):
  * prompts: prefill and decode are stretched by 1 / (1 - rho_p), rho_p = prompt tokens/s arriving x
    the fitted per-token cost (later arrivals' prefill chunks share this request's steps);
  * decode demand D (output tokens/s asked for): by Little's law the decode batch settles at N rows
    with N = D * t(N) / (1 - rho_p), t(N) the step time at N rows; this request's decode steps are
    predicted at max(active set + 1, N) rows. When even max_num_seqs rows cannot serve D
    (D * t(S) / S >= 1 - rho_p) the machine is saturated: the queue grows for as long as the overload
    lasts, no rank can promise a budget, and the prediction is multiplied by MAX_STRETCH.
The active set's decode rows of one adapter form one group at the largest rank among them, as the op
computes them (so joining an adapter already served at rank 64 costs rank 64 whatever its rank).
`choose_rank` serves the highest candidate rank predicted to meet the budget, its predictions scaled by
`margin` (latency_margin.py: learned from how long the requests predicted to fit really took).

Promises are kept: a request already served at a rank predicted to meet its budget (a promise) was
predicted with the load of its moment, and each request that joins the batch after it adds a decode row
to its remaining steps and its prompt's prefill steps before them. So a waiting request joins only when
no promise that still fits would end past its budget because of it (`hold_s`; the scheduler asks before
each admission), with, for each promise p,
    ahead   = the extra seconds of the prefill steps already pending, over plain decode steps
    step    = the active set's decode step; pace = p's own seconds per token so far, once a quarter of
              its tokens are out (the prefill steps of the requests that joined after it are in it)
    alone   = ahead + p's remaining tokens x step                         p's end if nobody joins
    without = ahead + p's remaining tokens x max(step, pace)
    with    = without + the extra seconds of the new prompt's prefill steps
                      + p's remaining tokens x (the step with the new row - step)
    the new request waits while some p has  alone <= p's budget left < with
(a promise past its budget even alone holds nobody: holding would not save it; its pace decides no
abandonment, as a cluster of arrivals at its start slows its first tokens far more than the rest), and
its prediction starts with that wait: `hold`, until `without` of the last promise that holds it.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass

import numpy as np

from matryoshka_lora.engine.latency_margin import LatencyMargin
from matryoshka_lora.engine.lora_batch import MAX_MASKED_ROWS

log = logging.getLogger(__name__)

FEATURES = ("const", "num_tokens", "lora_flops", "lora_reads", "num_groups", "attn_work", "num_sampled")


@dataclass(frozen=True)
class StepFeatures:
    num_tokens: int
    lora_flops: int
    lora_reads: int
    num_groups: int
    attn_work: int
    num_sampled: int

    def vector(self) -> np.ndarray:
        return np.array([1.0, self.num_tokens, self.lora_flops, self.lora_reads, self.num_groups, self.attn_work,
                         self.num_sampled])


@dataclass(frozen=True)
class LoadSnapshot:
    """What the engine is doing when a budgeted request arrives."""

    num_running: int
    num_waiting: int
    max_num_seqs: int
    # The active set: the running sequences and the waiting ones free slots admit next (`num_admitted`).
    adapters: tuple[tuple[int, int, int], ...]  # (adapter slot, active sequences, largest rank) per adapter
    context_sum: int  # sum of the active sequences' current lengths
    mean_remaining: float  # mean output tokens the active sequences still have to produce
    max_num_batched_tokens: int
    num_admitted: int = 0
    pending_prefill: int = 0  # prompt tokens of the active set not computed yet (prefilled before ours)
    prompt_tokens_per_s: float = 0.0  # recent arrival rate of prompt tokens (arrivals.RateMeter)
    decode_tokens_per_s: float = 0.0  # recent arrival rate of output tokens asked for (arrivals.RateMeter)
    promises: tuple[Promise, ...] = ()  # the active set's requests served at a rank predicted to fit


@dataclass(frozen=True)
class Promise:
    """An active request served at a rank predicted to meet its budget (rank_reason "budget")."""

    budget_left_s: float  # its budget minus the time since it was enqueued
    num_remaining: int  # output tokens it still has to produce
    seconds_per_token: float = 0.0  # its pace since its first token (prefill stalls in it), 0 early on


MAX_STRETCH = 20.0  # rho -> 1: the prediction says "far beyond any budget" rather than infinity


@dataclass(frozen=True)
class LatencyParts:
    """One prediction's terms (seconds), for its total and for the debug log of budget decisions.

    total = queue + hold + (prefill + decode) * stretch, times MAX_STRETCH when saturated"""

    queue: float
    hold: float  # waiting until the promises it would break have ended (see the module docstring)
    prefill: float
    decode: float  # the decode steps at `rows` rows
    stretch: float  # 1 / (1 - rho_p) from the prompt tokens arriving
    rows: float | None  # the decode batch's sustained rows; None: saturated

    @property
    def total(self) -> float:
        if self.rows is None:
            return (self.queue + self.hold + self.prefill + self.decode) * MAX_STRETCH
        return self.queue + self.hold + (self.prefill + self.decode) * self.stretch

    def describe(self) -> str:
        rows = "saturated" if self.rows is None else f"rows {self.rows:.1f}"
        return (f"queue {self.queue:.2f} + hold {self.hold:.2f} + "
                f"(prefill {self.prefill:.2f} + decode {self.decode:.2f}) "
                f"x stretch {self.stretch:.2f}, {rows}")


def decode_lora(adapters: tuple[tuple[int, int, int], ...], slot: int, rank: int) -> tuple[int, int, int]:
    """(lora_flops, lora_reads, num_groups) of a decode step of the running set plus one row of `slot`
    at `rank` (rank 0: a base-model row): each adapter's rows are groups of up to MAX_MASKED_ROWS rows
    at the adapter's largest rank."""
    per = {s: (n, r) for s, n, r in adapters}
    if rank > 0:
        n, r = per.get(slot, (0, 0))
        per[slot] = (n + 1, max(r, rank))
    flops = reads = groups = 0
    for n, r in per.values():
        g = math.ceil(n / MAX_MASKED_ROWS)
        flops, reads, groups = flops + n * r, reads + g * r, groups + g
    return flops, reads, groups


def sustained_rows(decode_tokens_per_s: float, free_share: float, min_rows: int, max_rows: int,
                   step_time) -> float | None:
    """Little's law for the decode batch: the rows N at which N / t(N) * free_share = decode_tokens_per_s
    (t = step_time, free_share = the machine's share left by prefill), at least min_rows; None when even
    max_rows rows cannot serve the demand (saturated)."""
    if decode_tokens_per_s <= 0:
        return float(min_rows)
    if decode_tokens_per_s * step_time(max_rows) >= max_rows * free_share:
        return None
    rows = float(min_rows)
    for _ in range(32):  # t is linear in rows with D * dt/dN < 1 here: a contraction
        rows = min(float(max_rows), max(float(min_rows), decode_tokens_per_s * step_time(rows) / free_share))
    return rows


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
    def __init__(self, coef: np.ndarray | None = None, ema: float = 0.1, refit_every: int = 128, max_recent: int = 512):
        # An uncalibrated default (seconds) so that predictions exist before warm-up.
        self.coef = coef if coef is not None else np.array([5e-3, 5e-4, 1e-7, 1e-5, 2e-4, 1e-7, 5e-4])
        self.correction = 1.0
        self.ema, self.refit_every = ema, refit_every
        self.warmup_samples: list[tuple[StepFeatures, float]] = []
        self.recent: collections.deque[tuple[StepFeatures, float]] = collections.deque(maxlen=max_recent)
        self._since_refit = 0
        self.margin = LatencyMargin()

    def fit(self, samples: list[tuple[StepFeatures, float]]) -> None:
        """Fit on warm-up samples (kept: every later refit includes them)."""
        self.warmup_samples = list(samples)
        self._refit()
        log.info("cost model: %s", ", ".join(f"{n}={c:.3g}" for n, c in zip(FEATURES, self.coef)))

    def _refit(self) -> None:
        samples = self.warmup_samples + list(self.recent)
        x = np.stack([f.vector() for f, _ in samples])
        y = np.array([t for _, t in samples])
        self.coef = nnls(x, y)
        self.correction, self._since_refit = 1.0, 0

    def predict_step(self, f: StepFeatures) -> float:
        return float(f.vector() @ self.coef) * self.correction

    def observe(self, f: StepFeatures, seconds: float) -> None:
        """A step as it ran: correction <- (1 - ema) * correction + ema * observed / raw prediction, and a
        refit on warm-up + recent steps every `refit_every` observations (once warm-up has fitted)."""
        if seconds <= 0:
            return
        raw = float(f.vector() @ self.coef)
        if raw > 0:
            self.correction = (1 - self.ema) * self.correction + self.ema * (seconds / raw)
        self.recent.append((f, seconds))
        self._since_refit += 1
        if self.warmup_samples and self._since_refit >= self.refit_every:
            self._refit()

    def predict_latency(self, load: LoadSnapshot, slot: int, num_prompt_tokens: int, max_tokens: int, rank: int) -> float:
        """Predicted seconds from enqueue to the last token for a new request on adapter `slot` at `rank`
        (0 = base)."""
        return self.predict_parts(load, slot, num_prompt_tokens, max_tokens, rank).total

    def predict_parts(self, load: LoadSnapshot, slot: int, num_prompt_tokens: int, max_tokens: int,
                      rank: int) -> LatencyParts:
        """predict_latency's terms."""
        active = load.num_running + load.num_admitted
        free = load.max_num_seqs - load.num_running
        ahead = load.num_waiting + 1 - free
        queue = 0.0
        if ahead > 0:
            waves = math.ceil(ahead / load.max_num_seqs)
            queue = waves * max(load.mean_remaining, 1.0) * self._active_step_s(load)
        hold = self.hold_s(load, slot, num_prompt_tokens, rank)
        prefill, _ = self._prefill_steps(load, load.pending_prefill + num_prompt_tokens, num_prompt_tokens, rank)
        steps = max(max_tokens - 1, 0)
        # contexts grow by one token per sequence per step: use the mean context over the decode
        mean_ctx = load.context_sum + active * steps / 2 + num_prompt_tokens + steps / 2
        lora_flops, lora_reads, num_groups = decode_lora(load.adapters, slot, rank)

        def step_at(rows: float) -> float:  # a decode step at `rows` rows with the active set's mix
            grow = rows / (active + 1)
            return self.predict_step(StepFeatures(round(rows), round(lora_flops * grow), lora_reads, num_groups,
                                                  round(mean_ctx * grow), round(rows)))

        stretch = self.arrival_stretch(load.prompt_tokens_per_s)
        rows = sustained_rows(load.decode_tokens_per_s, 1.0 / stretch, active + 1, load.max_num_seqs, step_at)
        decode = steps * step_at(load.max_num_seqs if rows is None else rows)
        return LatencyParts(queue, hold, prefill, decode, stretch, rows)

    def _active_step_s(self, load: LoadSnapshot) -> float:
        """A decode step of the active set as it stands."""
        active = load.num_running + load.num_admitted
        return self.predict_step(StepFeatures(active, *decode_lora(load.adapters, -1, 0), load.context_sum, active))

    def _prefill_steps(self, load: LoadSnapshot, num_tokens: int, num_own: int, rank: int) -> tuple[float, int]:
        """(seconds, steps) to prefill `num_tokens` prompt tokens, the last `num_own` of them a new
        request's at `rank`, in chunks beside the running set's decode rows."""
        n, running = load.num_running, decode_lora(load.adapters, -1, 0)
        seconds, left, steps = 0.0, num_tokens, 0
        while left > 0:  # a prompt chunk is a group of its own beside the running set's groups
            chunk = min(left, max(load.max_num_batched_tokens - n, 1))
            done = max(num_own - left, 0)
            flops, reads, groups = running
            if rank > 0:
                flops, reads, groups = flops + chunk * rank, reads + rank, groups + 1
            seconds += self.predict_step(StepFeatures(
                n + chunk, flops, reads, groups, load.context_sum + chunk * (done + chunk),
                n + (1 if left == chunk else 0),
            ))
            left, steps = left - chunk, steps + 1
        return seconds, steps

    def hold_s(self, load: LoadSnapshot, slot: int, num_prompt_tokens: int, rank: int) -> float:
        """Seconds a new request (adapter `slot` at `rank`) waits before it may join the batch, 0 for at
        once: until the last promise it would push past its budget ends (module docstring)."""
        if not load.promises:
            return 0.0
        active = load.num_running + load.num_admitted
        step = self._active_step_s(load)
        step_with = self.predict_step(StepFeatures(active + 1, *decode_lora(load.adapters, slot, rank),
                                                   load.context_sum + num_prompt_tokens, active + 1))
        pending_s, pending_steps = self._prefill_steps(load, load.pending_prefill, 0, 0)
        own_s, own_steps = self._prefill_steps(load, num_prompt_tokens, num_prompt_tokens, rank)
        ahead, extra = pending_s - pending_steps * step, own_s - own_steps * step
        held = []
        for p in load.promises:
            if ahead + p.num_remaining * step > p.budget_left_s:
                continue  # past its budget even if nobody else joins: holding would not save it
            end = ahead + p.num_remaining * max(step, p.seconds_per_token)
            if end + extra + p.num_remaining * (step_with - step) > p.budget_left_s:
                held.append(end)
        return max(held, default=0.0)

    def arrival_stretch(self, prompt_tokens_per_s: float) -> float:
        """1 / (1 - rho), rho = prompt tokens/s arriving x seconds per prefill token (capped at MAX_STRETCH)."""
        rho = prompt_tokens_per_s * self.coef[FEATURES.index("num_tokens")] * self.correction
        return MAX_STRETCH if rho >= 1 - 1 / MAX_STRETCH else 1.0 / (1.0 - rho)

    def choose_rank(
        self, load: LoadSnapshot, slot: int, num_prompt_tokens: int, max_tokens: int, candidates: list[int],
        budget_s: float, margin: float | None = None,
    ) -> tuple[int, bool, float, LatencyParts]:
        """(rank, met, predicted seconds, its terms): the highest candidate predicted within budget, else the
        lowest. Predictions are scaled by `margin` (default: the learned one, `self.margin.value()`); the
        terms are the chosen rank's, before the margin."""
        ranks = sorted(set(candidates))
        margin = self.margin.value() if margin is None else margin
        parts = {r: self.predict_parts(load, slot, num_prompt_tokens, max_tokens, r) for r in ranks}
        meeting = [r for r in ranks if margin * parts[r].total <= budget_s]
        rank = meeting[-1] if meeting else ranks[0]
        return rank, bool(meeting), margin * parts[rank].total, parts[rank]
