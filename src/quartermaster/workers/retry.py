"""Retry delays and per-partner circuit breakers (state lives in one worker process)."""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable


def backoff_delay(
    attempt: int, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with "equal jitter": attempt n waits between d/2 and d, where
    d = base·2^(n-1) (capped), so delays keep growing while retries of many jobs that failed
    together still spread out."""
    ceiling = min(max_s, base_s * (2 ** max(0, attempt - 1)))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``cooldown_s`` lets exactly one
    probe through (half-open): its success closes the breaker, its failure opens it again.

    While open, jobs for the partner are not attempted at all: they wait (without using up an
    attempt) until the breaker would let a probe through.
    """

    def __init__(
        self,
        partner: str,
        threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.partner = partner
        self.threshold = max(1, threshold)
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self.opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def wait_s(self) -> float:
        """How long a job refused by ``allow`` should wait before asking again."""
        if self.opened_at is None:
            return 0.0
        left = self.cooldown_s - (self.clock() - self.opened_at)
        if left <= 0:  # half-open, a probe is out: ask again when it has had time to answer
            return min(1.0, max(0.05, self.cooldown_s / 4))
        return left

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.threshold:
            self.opened_at = self.clock()
        self.probing = False

    def release_probe(self) -> None:
        """The probe ended without telling anything about the partner (e.g. a local error)."""
        self.probing = False
