"""A margin on the budget predictions, learned from how long promised requests really took.

Each request served at a rank *predicted* to meet its budget (rank_reason "budget") that ran its whole
max_tokens (so that prediction and observation cover the same work; EOS and stop strings are left out)
gives

    ratio = observed end-to-end latency / the cost model's prediction (before any margin)

    margin(now) = max(1, quantile_q(the ratios of the last `max_age_s` seconds))   with >= min_samples
                = 1 + (m - 1) * 0.5 ** ((now - t_m) / half_life_s)                  otherwise
    a budgeted request's prediction = margin x the cost model's

where m is the last margin computed from enough ratios, at t_m (1 before there ever was one). While a
load holds, about a fraction q of the requests predicted within their budget end within it; a margin
never raises a rank above what the plain model picks. Old ratios expire, so that the margin follows
the load down, and a margin left with too few ratios decays to 1 rather than dropping there (requests
promised right after it are promised under a margin still above 1).

The promised requests still running count too (a finished request teaches the margin a whole latency
late; a burst of arrivals slows every running request at once). After each step the engine projects
each one that has produced at least `MIN_PROGRESS` of its tokens to its end at its own pace so far

    projected ratio = (elapsed + remaining tokens x seconds per token since its first) / raw prediction

and margin(now) = max(the rule above, the worst of them) while that is fresh (set after every step;
one older than `fresh_s` is ignored).

    typical(now) = max(1, median of the recent ratios), decaying to 1 like the margin

The margin picks a rank (insurance); the typical margin decides a refusal (`--budget-unmet refuse`),
which is a sure miss: a request is refused only when even the median case ends past its budget. The
running projections stay out of `typical`: they run behind after slow steps, which the cost model's
step correction already puts into the prediction.
"""

from __future__ import annotations

import collections
import time

import numpy as np

from matryoshka_lora.errors import ConfigError

MIN_PROGRESS = 0.25  # of its tokens, before a running request's pace is projected
TYPICAL_QUANTILE = 0.5  # the typical margin's: the median


def pace_s(decode_s: float, num_output: int, num_remaining: int) -> float | None:
    """A running request's seconds per output token since its first; None before MIN_PROGRESS of its
    tokens are out (over its first few, it is mostly the prefill steps of the requests that came with it).

    decode_s: since its first token; num_output: tokens so far; num_remaining: tokens still to come."""
    if num_output < 2 or num_output < MIN_PROGRESS * (num_output + num_remaining):
        return None
    return decode_s / (num_output - 1)


def projected_ratio(
    raw_predicted_s: float, elapsed_s: float, decode_s: float, num_output: int, num_remaining: int
) -> float | None:
    """A running promised request's projected latency over its raw prediction; None before MIN_PROGRESS.

    elapsed_s: since it was enqueued; decode_s: since its first token; num_output: tokens so far."""
    pace = pace_s(decode_s, num_output, num_remaining)
    if raw_predicted_s <= 0 or pace is None:
        return None
    return (elapsed_s + num_remaining * pace) / raw_predicted_s


def in_flight_ratios(running, now: float) -> list[float]:
    """The projected ratios of the running sequences served at a rank predicted to meet their budget
    (those far enough along to project)."""
    ratios = []
    for s in running:
        if s.promised_s and s.first_token_t is not None:
            ratio = projected_ratio(
                s.promised_s,
                now - s.enqueue_t,
                now - s.first_token_t,
                s.num_output_tokens,
                s.max_len - len(s.token_ids),
            )
            if ratio is not None:
                ratios.append(ratio)
    return ratios


class LatencyMargin:
    def __init__(
        self,
        quantile: float = 0.95,
        max_age_s: float = 60.0,
        min_samples: int = 16,
        max_samples: int = 256,
        half_life_s: float = 60.0,
        fresh_s: float = 5.0,
    ):
        if not 0.0 < quantile <= 1.0:
            raise ConfigError("margin quantile", quantile, "0 < q <= 1")
        if not 1 <= min_samples <= max_samples:
            raise ConfigError("margin min_samples", min_samples, f"1..max_samples ({max_samples})")
        if not max_age_s > 0:
            raise ConfigError("margin max_age_s", max_age_s, "seconds > 0")
        if not half_life_s > 0:
            raise ConfigError("margin half_life_s", half_life_s, "seconds > 0")
        if not fresh_s > 0:
            raise ConfigError("margin fresh_s", fresh_s, "seconds > 0")
        self.quantile, self.max_age_s, self.min_samples = quantile, max_age_s, min_samples
        self.half_life_s, self.fresh_s = half_life_s, fresh_s
        self._in_flight: tuple[float, float] = (1.0, -float("inf"))  # (the worst projected ratio, when)
        # (quantile -> its last value computed from enough ratios, when)
        self._held: tuple[dict[float, float], float] = ({quantile: 1.0, TYPICAL_QUANTILE: 1.0}, 0.0)
        self._ratios: collections.deque[tuple[float, float]] = collections.deque(maxlen=max_samples)  # (t, ratio)

    def observe(self, predicted_s: float, observed_s: float, now: float | None = None) -> None:
        """A promised request that ran to its max_tokens: the raw prediction and its latency."""
        if predicted_s > 0 and observed_s > 0:
            self._ratios.append((time.perf_counter() if now is None else now, observed_s / predicted_s))

    def in_flight(self, ratios: list[float], now: float | None = None) -> None:
        """The projected ratios of the promised requests running now (`in_flight_ratios`); the worst counts."""
        self._in_flight = (max([1.0, *ratios]), time.perf_counter() if now is None else now)

    def value(self, now: float | None = None) -> float:
        """The margin: the learned `quantile`, and at least the worst running projection while fresh."""
        now = time.perf_counter() if now is None else now
        learned = self._learned(now)[self.quantile]
        worst, set_at = self._in_flight
        return max(learned, worst) if now - set_at <= self.fresh_s else learned

    def typical(self, now: float | None = None) -> float:
        """The typical margin: the learned median (the running projections do not count)."""
        return self._learned(time.perf_counter() if now is None else now)[TYPICAL_QUANTILE]

    def _learned(self, now: float) -> dict[float, float]:
        """Both learned quantiles (the margin's and the median), held together so that they decay together."""
        while self._ratios and now - self._ratios[0][0] > self.max_age_s:
            self._ratios.popleft()
        if len(self._ratios) < self.min_samples:
            held, held_t = self._held
            return {q: 1.0 + (m - 1.0) * 0.5 ** (max(now - held_t, 0.0) / self.half_life_s) for q, m in held.items()}
        quantiles = (self.quantile, TYPICAL_QUANTILE)
        values = np.quantile([r for _, r in self._ratios], quantiles)
        learned = {q: max(1.0, float(v)) for q, v in zip(quantiles, values, strict=True)}
        self._held = (learned, now)
        return learned
