"""Typed errors, rooted at :class:`SaJobsError`, plus control-flow signals for handlers."""

from __future__ import annotations

import datetime as dt
import decimal
import math
import numbers
from typing import Any, Union


class SaJobsError(Exception):
    """Root of every error sa-jobs raises."""


class ConfigurationError(SaJobsError, ValueError):
    """Bad option, URL, schema or queue name, given by the caller."""


class EmbeddedServerError(SaJobsError, RuntimeError):
    """The embedded PostgreSQL (``sa_jobs.embedded``) could not be started; the message says what to do."""


class InvalidIdentifierError(ConfigurationError):
    """A name that would reach SQL (schema, queue, kind, channel) is not acceptable."""


class InvalidArgsError(SaJobsError, TypeError):
    """Job args are not plain JSON (or exceed the size cap). Raised at construction."""


class UnknownKindError(SaJobsError, LookupError):
    """No handler is registered for a job kind."""


class SchemaVersionError(SaJobsError):
    """The installed queue schema is older or newer than this sa-jobs needs."""


class SchemaLockTimeoutError(SaJobsError, TimeoutError):
    """A schema upgrade gave up waiting for a table lock (its ``lock_timeout``, retried):
    another transaction holds the table. ``blockers`` are the pids of the sessions that
    held the queue's tables in a transaction at least that long (empty if none was seen)."""

    def __init__(self, message: str, blockers: "list[int] | None" = None) -> None:
        super().__init__(message)
        self.blockers = list(blockers or [])


class JobNotFoundError(SaJobsError, LookupError):
    """No job row has the given id (or it is not in a state the operation accepts)."""


class LeaseLostError(SaJobsError):
    """This worker no longer holds the job: its lease expired and it may run elsewhere.

    Raised inside a handler's transactional session at commit, and the reason a
    handler's cancel scope is cancelled when heartbeats fail for longer than the lease.
    """


class StatementInterruptedError(SaJobsError):
    """A statement of ``ctx.async_transaction()`` was interrupted by a cancel scope of the
    handler's own that it caught (``anyio.move_on_after()``) and carried on: the driver gave
    the connection up, so the transaction is lost and nothing of it commits. The attempt
    fails with this error; the statement is cancelled on the server.
    """


# ---- control flow a handler may raise -------------------------------------------


class JobControl(SaJobsError):
    """Base for signals a handler raises to steer its job rather than report a bug."""


class Discard(JobControl):
    """Fail the job permanently: it goes to ``dead`` without further attempts."""


class Cancel(JobControl):
    """Stop the job for good: it goes to ``cancelled`` (not an error, not retried)."""


def real_seconds(value: Any) -> float:
    """``float(value)`` of a real number that always gives a float: an int or Fraction past
    float's range (OverflowError) is that infinity, a signalling NaN (ValueError) NaN. The
    range checks after it then refuse them as ConfigurationError, where they escaped raw."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf
    except ValueError:  # Decimal('sNaN')
        return math.nan


def duration_seconds(value: object) -> float:
    """``value`` (a number or a timedelta) in seconds; NaN for anything else (a bool, a
    str, a signalling NaN), which every range check then refuses."""
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, ArithmeticError):  # a signalling NaN
            return math.nan
    return math.nan


class Snooze(JobControl):
    """Run the job again after ``seconds`` (a number, or a timedelta as ``delay=`` takes)
    without spending an attempt."""

    def __init__(self, seconds: Union[float, dt.timedelta]) -> None:
        # float() of anything: "5" and True were 5 s and 1 s, a timedelta a bare TypeError
        # in the handler (its attempt spent as a failure, not snoozed).
        value = duration_seconds(seconds)
        if not 0 <= value <= 366 * 24 * 3600:
            raise ConfigurationError(f"snooze for 0 seconds to a year (a number or a timedelta), not {seconds!r}")
        super().__init__(f"snoozed for {value}s")
        self.seconds = value
