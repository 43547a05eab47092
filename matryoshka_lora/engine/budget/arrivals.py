"""What arrives, for the budget predictions: prefill seconds/s and output tokens/s asked for, as decaying rates.

    rate(now) = sum over arrivals of amount x exp(-age / window_s) / window_s
Each admitted request adds the seconds its prefill adds to the machine's work (the cost model's
`marginal_prefill_s` at the rank it got), so the prefill rate is the share of the machine arriving
prompts take (rho_p); the cost model turns it and the output demand into the prediction's stretch and
the decode batch's sustained rows (Little's law).
"""

from __future__ import annotations

import math


class RateMeter:
    """An exponentially decaying rate: rate = sum of amounts weighted by exp(-age / window_s) / window_s."""

    def __init__(self, window_s: float = 20.0):
        self.window_s, self._sum, self._t = window_s, 0.0, None

    def _decayed(self, now: float) -> float:
        return 0.0 if self._t is None else self._sum * math.exp(-(now - self._t) / self.window_s)

    def add(self, amount: float, now: float) -> None:
        self._sum, self._t = self._decayed(now) + amount, now

    def rate(self, now: float) -> float:
        return self._decayed(now) / self.window_s


class Arrivals:
    """What arrives, for the budget predictions: prefill seconds/s and output tokens/s asked for.

    The output demand counts each request's max_tokens times `output_fill`, the EMA of generated / asked
    over finished requests (requests that stop at EOS ask for less than their max_tokens)."""

    def __init__(self, window_s: float = 20.0, ema: float = 0.1):
        self.prefill_seconds, self.decode_tokens = RateMeter(window_s), RateMeter(window_s)
        self.output_fill, self.ema = 1.0, ema

    def add(self, prefill_s: float, max_tokens: int, now: float) -> None:
        """An admitted request: the seconds its prefill adds (predicted) and the output tokens it asks for."""
        self.prefill_seconds.add(prefill_s, now)
        self.decode_tokens.add(max_tokens * self.output_fill, now)

    def finished(self, num_generated: int, num_asked: int) -> None:
        if num_asked > 0:
            self.output_fill = (1 - self.ema) * self.output_fill + self.ema * min(num_generated / num_asked, 1.0)
