"""Hits that pay: is loading ``n`` tokens expected to be faster than recomputing them?

From what the engine observed, not from a model of the hardware:

- recompute: seconds per token of the engine's own steps (``observe_step``: tokens scheduled
  in a step, its wall time), the median of the last ``window`` steps of at least
  ``min_step_tokens`` tokens (a median, so an interval that included idle time or a
  stall does not move it);
- load: ``fixed + per_token * n`` seconds, a least-squares fit over the last ``window``
  finished loads (``observe_load``: tokens loaded, seconds from the load being scheduled
  to the request being ready, every scheduler step waited included).

``pays(n)`` is True while either side has fewer than ``min_observations`` samples (nothing
known: report the hit), else iff the predicted load time is below the predicted recompute
time. One refused hit in ``explore_every`` is reported anyway, so the load fit keeps
following the disk (a page cache warming up, another engine's load).

Invariants: ``pays`` is monotone in ``n`` for one state of the fit (a hit longer than the
crossover pays when a shorter one does); ``fixed`` and ``per_token`` are never negative.
"""

from __future__ import annotations

import statistics
from collections import deque

__all__ = ["HitCost"]


class HitCost:
    def __init__(self, *, window: int = 32, min_observations: int = 3,
                 min_step_tokens: int = 64, explore_every: int = 16):
        self.min_observations = min_observations
        self.min_step_tokens = min_step_tokens
        self.explore_every = explore_every
        self._step: deque[float] = deque(maxlen=window)  # seconds per token
        self._loads: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds)
        self._refused = 0
        self._fit: tuple[float, float] | None = None

    # ------------------------------------------------------------------ observations
    def observe_step(self, tokens: int, seconds: float) -> None:
        """An engine step computed ``tokens`` tokens in ``seconds``."""
        if tokens >= self.min_step_tokens and seconds > 0:
            self._step.append(seconds / tokens)

    def observe_load(self, tokens: int, seconds: float) -> None:
        """A hit of ``tokens`` tokens took ``seconds`` from scheduled to ready."""
        if tokens > 0 and seconds >= 0:
            self._loads.append((tokens, seconds))
            self._fit = None

    # ------------------------------------------------------------------ predictions
    @property
    def known(self) -> bool:
        return (len(self._step) >= self.min_observations
                and len(self._loads) >= self.min_observations)

    def recompute_seconds(self, n: int) -> float:
        return statistics.median(self._step) * n if self._step else 0.0

    def load_fit(self) -> tuple[float, float]:
        """``(fixed, per_token)`` seconds of a load (zeros before any load was seen)."""
        if self._fit is None:
            self._fit = _fit(list(self._loads))
        return self._fit

    def load_seconds(self, n: int) -> float:
        fixed, per_token = self.load_fit()
        return fixed + per_token * n

    def crossover_tokens(self) -> float | None:
        """The hit length above which loading is expected to pay (None: not known yet;
        ``inf``: never)."""
        if not self.known:
            return None
        fixed, per_token = self.load_fit()
        recompute = statistics.median(self._step)
        if recompute <= per_token:
            return float("inf")
        return fixed / (recompute - per_token)

    def pays(self, n: int) -> bool:
        """Report a hit of ``n`` tokens? (one refusal in ``explore_every`` is reported)"""
        if not self.known or self.load_seconds(n) < self.recompute_seconds(n):
            return True
        self._refused += 1
        return self.explore_every > 0 and self._refused % self.explore_every == 0


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``seconds = fixed + per_token * tokens``, clamped non-negative."""
    if not points:
        return 0.0, 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx <= 1e-9 * max(1.0, mx * mx):  # one length only: all of it may be fixed cost
        return my, 0.0
    per_token = sum((x - mx) * (y - my) for x, y in points) / sxx
    fixed = my - per_token * mx
    if per_token < 0:
        return my, 0.0
    if fixed < 0:  # through the origin
        return 0.0, sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    return fixed, per_token
