"""Latency budget -> rank: a per-step cost model, fitted at warm-up and refitted from observed steps.

    step_time = a + b * num_tokens + c * lora_flops + d * lora_reads + e * num_groups
                  + f * attn_work + g * num_sampled                     (the features: step_features.py)
Coefficients come from non-negative least squares on the warm-up steps (the median of repeats per
case). Every observed step then goes into a window of recent steps, and the model is refitted on
warm-up + recent steps every `refit_every` observations; between refits a correction factor (EMA of
observed / predicted) follows drift quickly.

A request's end-to-end latency at rank r of adapter slot a, under the current load, is predicted as
    queue wait  (waves of max_num_seqs ahead of it x decode steps of the active set)
  + prefill     (the active set's pending prompts, then its own, in the scheduler's chunks beside the
                 decode rows of the running sequences: step_features.plan_prefill)
  + decode      (max_tokens - 1 steps of the active set plus it, contexts growing)
where the active set is the running sequences plus the waiting ones that free slots admit first.
Requests arriving during this one's life are counted from two arrival rates (arrivals.py):
  * prompts: prefill and decode are stretched by 1 / (1 - rho_p), rho_p = the prefill seconds arriving
    per second, each admitted prompt counted at `marginal_prefill_s` (later arrivals' prefill chunks
    share this request's steps, and each turns a one-call decode step into a per-call one);
  * decode demand D (output tokens/s asked for): by Little's law the decode batch settles at N rows
    with N = D * t(N) / (1 - rho_p), t(N) the step time at N rows; this request's decode steps are
    predicted at its mean rows over its life (`mean_rows`): 1 + the active set while it lasts
    (active x min(mean remaining, steps) / steps) + N / 2 (the arrivals, growing towards N). When even
    max_num_seqs rows cannot serve D (D * t(S) / S >= 1 - rho_p) the machine is saturated: the queue
    grows for as long as the overload lasts, no rank can promise a budget, and the prediction is
    multiplied by MAX_STRETCH.
The active set's decode rows of one adapter form one group read at the largest rank among them, each row
computed at row_cost_rank (its own rank, at least 16, at most the group's), as the C op computes them.
`choose_rank` serves the highest candidate rank predicted to meet the budget that leaves headroom (a next
request like it, this one admitted, still predicted within the budget at the lowest rank), its predictions
scaled by `margin` (latency_margin.py: learned from how long the requests predicted to fit really took).
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from matryoshka_lora.engine.budget.latency_margin import LatencyMargin
from matryoshka_lora.engine.budget.step_features import (
    FEATURES,
    PendingPrompt,
    StepFeatures,
    plan_prefill,
    row_cost_rank,
)
from matryoshka_lora.engine.lora_batch import MAX_MASKED_ROWS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSnapshot:
    """What the engine is doing when a budgeted request arrives."""

    num_running: int
    num_waiting: int
    max_num_seqs: int
    # The active set: the running sequences and the waiting ones free slots admit next (`num_admitted`).
    adapters: tuple[tuple[int, tuple[int, ...]], ...]  # (adapter slot, its active sequences' ranks) per adapter
    context_sum: int  # sum of the active sequences' current lengths
    mean_remaining: float  # mean output tokens the active sequences still have to produce
    max_num_batched_tokens: int
    num_admitted: int = 0
    pending_prompts: tuple[PendingPrompt, ...] = ()  # the active set's prompts not computed yet, in order
    num_prefilling: int = 0  # running sequences among them (not decode rows yet)
    prefill_share: float = 0.0  # rho_p: prefill seconds arriving per second (arrivals.RateMeter)
    decode_tokens_per_s: float = 0.0  # recent arrival rate of output tokens asked for (arrivals.RateMeter)

    @property
    def pending_prefill(self) -> int:
        """Prompt tokens of the active set not computed yet (prefilled before a new request's)."""
        return sum(p.num_left for p in self.pending_prompts)


MAX_STRETCH = 20.0  # rho -> 1: the prediction says "far beyond any budget" rather than infinity


@dataclass(frozen=True)
class LatencyParts:
    """One prediction's terms (seconds), for its total and for the debug log of budget decisions.

    total = queue + (prefill + decode) * stretch, times MAX_STRETCH when saturated"""

    queue: float
    prefill: float
    decode: float  # the decode steps at `rows` rows
    stretch: float  # 1 / (1 - rho_p) from the prompt tokens arriving
    rows: float | None  # the decode batch's sustained rows; None: saturated

    @property
    def total(self) -> float:
        if self.rows is None:
            return (self.queue + self.prefill + self.decode) * MAX_STRETCH
        return self.queue + (self.prefill + self.decode) * self.stretch

    def describe(self) -> str:
        rows = "saturated" if self.rows is None else f"rows {self.rows:.1f}"
        return (
            f"queue {self.queue:.2f} + "
            f"(prefill {self.prefill:.2f} + decode {self.decode:.2f}) "
            f"x stretch {self.stretch:.2f}, {rows}"
        )


def decode_lora(adapters: tuple[tuple[int, tuple[int, ...]], ...], slot: int, rank: int) -> tuple[int, int, int]:
    """(lora_flops, lora_reads, num_groups) of a decode step of the running set plus one row of `slot`
    at `rank` (rank 0: a base-model row): each adapter's rows, ordered by rank, are groups of up to
    MAX_MASKED_ROWS rows, each read at its largest rank, each row computed at row_cost_rank."""
    per = {s: list(ranks) for s, ranks in adapters}
    if rank > 0:
        per.setdefault(slot, []).append(rank)
    flops = reads = groups = 0
    for ranks in per.values():
        ranks.sort()
        for i in range(0, len(ranks), MAX_MASKED_ROWS):
            group = ranks[i : i + MAX_MASKED_ROWS]
            top = group[-1]
            flops += sum(row_cost_rank(r, top) for r in group)
            reads, groups = reads + top, groups + 1
    return flops, reads, groups


def sustained_rows(
    decode_tokens_per_s: float, free_share: float, min_rows: int, max_rows: int, step_time
) -> float | None:
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
    def __init__(
        self,
        coef: np.ndarray | None = None,
        ema: float = 0.1,
        refit_every: int = 128,
        max_recent: int = 512,
        refuse_on_typical: bool = True,
        headroom: bool = True,
        max_one_call_rows: int = 0,
    ):
        # An uncalibrated default (seconds) so that predictions exist before warm-up.
        self.coef = coef if coef is not None else np.array([5e-3, 5e-4, 1e-7, 1e-5, 2e-4, 1e-7, 5e-4, 1e-3, 1e-4, 5e-4])
        self.max_one_call_rows = max_one_call_rows  # decode steps of up to this many rows: one C call
        self.correction = 1.0
        self.ema, self.refit_every = ema, refit_every
        self.warmup_samples: list[tuple[StepFeatures, float]] = []
        self.recent: collections.deque[tuple[StepFeatures, float]] = collections.deque(maxlen=max_recent)
        self._since_refit = 0
        self.margin = LatencyMargin()
        self.refuse_on_typical = refuse_on_typical  # False: a refusal is decided on the margin's prediction
        self.headroom = headroom  # False: the highest rank that fits, whatever it costs the next request

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

    def predict_latency(
        self, load: LoadSnapshot, slot: int, num_prompt_tokens: int, max_tokens: int, rank: int
    ) -> float:
        """Predicted seconds from enqueue to the last token for a new request on adapter `slot` at `rank`
        (0 = base)."""
        return self.predict_parts(load, slot, num_prompt_tokens, max_tokens, rank).total

    def predict_parts(
        self, load: LoadSnapshot, slot: int, num_prompt_tokens: int, max_tokens: int, rank: int
    ) -> LatencyParts:
        """predict_latency's terms."""
        active = load.num_running + load.num_admitted
        free = load.max_num_seqs - load.num_running
        ahead = load.num_waiting + 1 - free
        queue = 0.0
        if ahead > 0:
            waves = math.ceil(ahead / load.max_num_seqs)
            queue = waves * max(load.mean_remaining, 1.0) * self._active_step_s(load)
        own = PendingPrompt(num_prompt_tokens, 0, rank)
        prefill, _ = self._prefill_steps(load, (*load.pending_prompts, own))
        steps = max(max_tokens - 1, 0)
        # contexts grow by one token per sequence per step: use the mean context over the decode
        mean_ctx = load.context_sum + active * steps / 2 + num_prompt_tokens + steps / 2
        lora_flops, lora_reads, num_groups = decode_lora(load.adapters, slot, rank)

        def step_at(rows: float) -> float:  # a decode step at `rows` rows with the active set's mix
            grow = rows / (active + 1)
            n = round(rows)
            return self.predict_step(
                StepFeatures(
                    n, round(lora_flops * grow), lora_reads, num_groups, round(mean_ctx * grow), n, self._per_call(n)
                )
            )

        stretch = self.arrival_stretch(load.prefill_share)
        sustained = sustained_rows(load.decode_tokens_per_s, 1.0 / stretch, 1, load.max_num_seqs, step_at)
        rows = None if sustained is None else self.mean_rows(load, steps, sustained)
        decode = steps * step_at(load.max_num_seqs if rows is None else rows)
        return LatencyParts(queue, prefill, decode, stretch, rows)

    @staticmethod
    def mean_rows(load: LoadSnapshot, steps: int, sustained: float) -> float:
        """The decode rows over a new request's `steps` decode steps: itself, the active set's rows while
        they last (each leaves after its remaining tokens, about mean_remaining), and the rows arriving
        meanwhile, which grow from none towards the sustained level: half of it on average."""
        active = load.num_running + load.num_admitted
        staying = active * min(load.mean_remaining, steps) / steps if steps else float(active)
        return min(float(load.max_num_seqs), 1.0 + staying + 0.5 * sustained)

    def _active_step_s(self, load: LoadSnapshot) -> float:
        """A decode step of the active set as it stands."""
        active = load.num_running + load.num_admitted
        lora = decode_lora(load.adapters, -1, 0)
        return self.predict_step(StepFeatures(active, *lora, load.context_sum, active, self._per_call(active)))

    def _per_call(self, decode_rows: int) -> int:
        """The per_call feature of a decode-only step of `decode_rows` rows."""
        return 0 if decode_rows <= self.max_one_call_rows else 1

    def _prefill_steps(self, load: LoadSnapshot, prompts: tuple[PendingPrompt, ...]) -> tuple[float, int]:
        """(seconds, steps) to prefill `prompts` in chunks beside the running set's decode rows
        (step_features.plan_prefill)."""
        steps = plan_prefill(
            prompts,
            load.num_running - load.num_prefilling,
            decode_lora(load.adapters, -1, 0),
            load.context_sum,
            load.max_num_batched_tokens,
        )
        return sum(self.predict_step(f) for f in steps), len(steps)

    def marginal_prefill_s(self, load: LoadSnapshot, num_prompt_tokens: int, rank: int) -> float:
        """The seconds a prompt adds to the machine's work: its prefill steps beside the running decode rows,
        less the decode-only steps those rows would run anyway (at least 0)."""
        decode_rows = load.num_running - load.num_prefilling
        lora = decode_lora(load.adapters, -1, 0)
        steps = plan_prefill(
            (PendingPrompt(num_prompt_tokens, 0, rank),),
            decode_rows,
            lora,
            load.context_sum,
            load.max_num_batched_tokens,
        )
        with_prompt = sum(self.predict_step(f) for f in steps)
        if decode_rows == 0:
            return with_prompt
        alone = StepFeatures(decode_rows, *lora, load.context_sum, decode_rows, self._per_call(decode_rows))
        return max(with_prompt - len(steps) * self.predict_step(alone), 0.0)

    @staticmethod
    def arrival_stretch(prefill_share: float) -> float:
        """1 / (1 - rho_p), rho_p = prefill seconds arriving per second (capped at MAX_STRETCH)."""
        return MAX_STRETCH if prefill_share >= 1 - 1 / MAX_STRETCH else 1.0 / (1.0 - prefill_share)

    def choose_rank(
        self,
        load: LoadSnapshot,
        slot: int,
        num_prompt_tokens: int,
        max_tokens: int,
        candidates: list[int],
        budget_s: float,
        margin: float | None = None,
    ) -> tuple[int, bool, float, LatencyParts]:
        """(rank, met, predicted seconds, its terms): the highest candidate predicted within budget that
        leaves headroom (`leaves_headroom`), else the lowest. Predictions are scaled by `margin` (default:
        the learned one, `self.margin.value()`); the terms are the chosen rank's, before the margin."""
        ranks = sorted(set(candidates))
        margin = self.margin.value() if margin is None else margin
        parts = {r: self.predict_parts(load, slot, num_prompt_tokens, max_tokens, r) for r in ranks}
        meeting = [r for r in ranks if margin * parts[r].total <= budget_s]
        rank = ranks[0]
        for r in reversed(meeting):
            if r == ranks[0] or self.leaves_headroom(
                load, slot, num_prompt_tokens, max_tokens, r, ranks[0], budget_s / margin
            ):
                rank = r
                break
        return rank, bool(meeting), margin * parts[rank].total, parts[rank]

    def leaves_headroom(
        self,
        load: LoadSnapshot,
        slot: int,
        num_prompt_tokens: int,
        max_tokens: int,
        rank: int,
        lowest: int,
        budget_s: float,
    ) -> bool:
        """Whether a next request like this one, arriving once this one is admitted at `rank`, is still predicted
        within `budget_s` at the `lowest` rank: a high rank is served only while it does not take the room the
        requests after it need (always True with headroom off)."""
        if not self.headroom:
            return True
        after = with_request(load, slot, num_prompt_tokens, max_tokens, rank)
        return self.predict_latency(after, slot, num_prompt_tokens, max_tokens, lowest) <= budget_s


def with_request(load: LoadSnapshot, slot: int, num_prompt_tokens: int, max_tokens: int, rank: int) -> LoadSnapshot:
    """`load` once a request (its prompt, max_tokens, at `rank` of adapter `slot`) is enqueued: it waits, and
    with a KV slot free it is among the admitted next (the active set), its prompt pending."""
    active = load.num_running + load.num_admitted
    if active >= load.max_num_seqs:
        return replace(load, num_waiting=load.num_waiting + 1)
    adapters = dict(load.adapters)
    if rank > 0:
        adapters[slot] = tuple(sorted((*adapters.get(slot, ()), rank)))
    return replace(
        load,
        num_admitted=load.num_admitted + 1,
        num_waiting=load.num_waiting + 1,
        adapters=tuple(sorted(adapters.items())),
        context_sum=load.context_sum + num_prompt_tokens,
        mean_remaining=(load.mean_remaining * active + max_tokens) / (active + 1),
        pending_prompts=(*load.pending_prompts, PendingPrompt(num_prompt_tokens, 0, rank)),
    )
