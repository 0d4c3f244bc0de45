"""Backoff as pure functions: ``(attempt) -> seconds`` until the next try.

The worker turns the seconds into ``now() + interval`` in SQL, so the schedule always
follows the database clock, never the worker's.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Callable, Union

from .errors import ConfigurationError, duration_seconds

# Seconds, or a timedelta (as delay= and Snooze take one).
BackoffPolicy = Callable[[int], Union[float, dt.timedelta]]

MAX_BACKOFF_SECONDS = 24 * 3600.0
# The longest delay the worker schedules, whatever a policy returns (as long as a Snooze
# may last): ``now() + delay`` must stay a timestamp both PostgreSQL and Python's datetime
# (year 9999) can hold, or the failure could not be written at all.
MAX_DELAY_SECONDS = 366 * 24 * 3600.0


def exponential_backoff(
    attempt: int,
    *,
    base: float = 1.0,
    factor: float = 2.0,
    cap: float = MAX_BACKOFF_SECONDS,
    jitter: float = 0.1,
    rng: Callable[[], float] = random.random,
) -> float:
    """``base * factor**(attempt-1)`` seconds, capped, then scaled by ``1 ± jitter``.

    ``attempt`` is the attempt that just failed (1 for the first). The exponent is capped
    before it is computed, so a huge attempt number never overflows.
    """
    if attempt < 1:
        attempt = 1
    exponent = min(attempt - 1, 64)
    raw = min(cap, base * factor**exponent)
    spread = raw * jitter
    return max(0.0, raw - spread + 2.0 * spread * rng())


def backoff_bounds(attempt: int, *, base: float = 1.0, factor: float = 2.0, cap: float = MAX_BACKOFF_SECONDS, jitter: float = 0.1) -> tuple[float, float]:
    """The interval :func:`exponential_backoff` draws from, for tests and docs."""
    raw = min(cap, base * factor ** min(max(attempt, 1) - 1, 64))
    return max(0.0, raw * (1 - jitter)), raw * (1 + jitter)


def constant_backoff(seconds: Union[float, dt.timedelta]) -> BackoffPolicy:
    """A policy that always waits ``seconds`` (a number or a timedelta; handy for tests and
    rate-limited APIs).

    Checked here: a timedelta, a negative or NaN value was taken, and the worker, finding
    no usable delay at each failure, logged it and fell back to the default backoff."""
    value = duration_seconds(seconds)
    if not 0 <= value <= MAX_DELAY_SECONDS:
        raise ConfigurationError(
            f"constant_backoff takes 0 seconds to a year (a number or a timedelta), not {seconds!r}")

    def policy(attempt: int) -> float:
        return value

    return policy
