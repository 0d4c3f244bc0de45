"""The mapped ``Job`` class: every job kind is a single-table-inheritance subclass.

A kind is declared once, with its defaults as class keywords::

    class SendReceipt(Job, kind="send_receipt", queue="emails", max_attempts=5):
        pass

    @SendReceipt.handler
    async def send_receipt(ctx: JobContext, order_id: int) -> None: ...

``SendReceipt(order_id=7)`` is a row for the caller's own ``session.add()``; it commits or
rolls back with the business rows of that transaction, and ``select(SendReceipt)`` reads
the kind's history.

A kind may subclass another kind (``class SendGift(SendReceipt, kind="send_gift")``): it
inherits the parent's options, each keyword it gives overriding one, and its handler.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import inspect
import json
import math
import numbers
import uuid
from collections import abc
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union, cast

from sqlalchemy import BigInteger, DateTime, Identity, Integer, SmallInteger, Table, Text, func, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from . import _validate
from ._bulk_guard import register_bulk_guards
from .errors import ConfigurationError, InvalidArgsError, duration_seconds, real_seconds
from .retry import BackoffPolicy, exponential_backoff
from .schema import DEFAULT_SCHEMA, JOBS_TABLE
from .states import PENDING_STATES
from .unique import Unique, note_unique_kind, register_session_hook

Handler = Callable[..., Any]


def is_async_handler(fn: Handler) -> bool:
    """Whether calling ``fn`` gives a coroutine to await on the loop.

    ``inspect.iscoroutinefunction`` sees ``async def`` functions, methods and partials of
    them, but not an object whose ``__call__`` is ``async def`` (a class-based handler):
    that one was run in a thread, its coroutine never awaited, and the job ended dead
    ("result is a coroutine").
    """
    import functools

    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    return not inspect.isroutine(fn) and not isinstance(fn, type) and inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)
    )

_SERVER_DEFAULT_MAX_ATTEMPTS = 20  # the jobs table's DEFAULT for max_attempts

# The partition key Job.__init__ derived from the args, in the job's __dict__: the flush takes
# the key again from the final args only while the row's key is still that one. A key given
# (options(partition_key=), the attribute, one a merge copy or a transient copy of a stored
# job carries) has no such record, and stays.
_PARTITION_DERIVED = "_sa_jobs_partition_derived"

# The args object Job.__init__ checked, in the job's __dict__: the flush checks a new job's
# args again only if another object was assigned since (one identity test per new job).
_ARGS_CHECKED = "_sa_jobs_args_checked"

# The queue options(queue=) moved a stored by_queue job to while its key or args were not
# loaded (expired by a commit): the key is moved at flush, which may load them.
_QUEUE_MOVED = "_sa_jobs_queue_moved"


class _Inherited(enum.Enum):
    """The default of a kind's option keywords: not given, so inherited from the parent
    kind. A sentinel, not None: ``timeout=None`` and ``unique=None`` are values to give."""

    INHERITED = "inherited"


_INHERITED = _Inherited.INHERITED


@dataclass(frozen=True)
class KindOptions:
    """Per-kind defaults, set once in the class statement."""

    kind: str
    queue: str = "default"
    priority: int = 0
    max_attempts: int = _SERVER_DEFAULT_MAX_ATTEMPTS
    timeout: Optional[float] = None
    backoff: BackoffPolicy = field(default=exponential_backoff)
    tags: tuple[str, ...] = ()
    max_args_bytes: int = _validate.DEFAULT_MAX_ARGS_BYTES
    unique: Optional[Unique] = None
    # Args whose values form the job's partition key (e.g. ("customer_id",)): a queue's
    # partition_concurrency limit counts running jobs per key.
    partition_by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _validate.kind_name(self.kind)
        _validate.queue_name(self.queue)
        _check_priority(self.priority)
        _check_attempts(self.max_attempts)
        if self.timeout is not None:
            object.__setattr__(self, "timeout", _timeout_seconds(self.timeout))
        if not callable(self.backoff):
            raise ConfigurationError("backoff must be a callable (attempt) -> seconds")
        if is_async_handler(self.backoff):
            # The worker calls it on its loop without awaiting: every retry fell back to the
            # default backoff (logged), the kind's own never applied.
            raise ConfigurationError(f"backoff must be a plain (not async) callable (attempt) -> seconds, not {self.backoff!r}")
        if type(self.max_args_bytes) is not int or not 1 <= self.max_args_bytes <= _validate.JSONB_MAX_BYTES:
            # Above jsonb's own ceiling the cap promises args the server refuses, at flush.
            raise ConfigurationError(f"max_args_bytes must be an int from 1 to {_validate.JSONB_MAX_BYTES:,}"
                                     f" (jsonb's limit), not {self.max_args_bytes!r}")
        if self.unique is not None and not isinstance(self.unique, Unique):
            raise ConfigurationError(f"unique= takes a sa_jobs.Unique(...), not {self.unique!r}")
        if (isinstance(self.partition_by, str) or not isinstance(self.partition_by, abc.Iterable)
                or not all(isinstance(a, str) and a for a in self.partition_by)):
            raise ConfigurationError(f"partition_by must be a tuple of argument names, not {self.partition_by!r}")

    def partition_key_of(self, args: Mapping[str, Any]) -> Optional[str]:
        """The partition key of a job with ``args``: the named args' values as compact JSON
        (one value alone as its JSON text, so ``customer_id=7`` gives ``7``)."""
        if not self.partition_by:
            return None
        missing = [a for a in self.partition_by if a not in args]
        if missing:
            raise ConfigurationError(
                f"kind {self.kind!r} is partitioned by {list(self.partition_by)}, but args lack {missing}")
        return _validate.partition_key(self.partition_text(args))

    def partition_text(self, args: Mapping[str, Any]) -> str:
        """The unchecked text of :meth:`partition_key_of` (KeyError for a missing arg).

        Of the values as jsonb stores them (``-0.0`` as ``0.0``, ``1e16`` as
        ``10000000000000000``), as the unique key is: jobs whose stored args a worker reads
        alike counted against two keys of a partition limit."""
        by = self.partition_by
        if len(by) > 1:
            return _partition_json(_validate.as_stored([args[a] for a in by]))
        value = args[by[0]]
        # Fast paths for the usual keys (a customer id), with json.dumps' exact text: the
        # key is checked again for every new row at flush.
        if type(value) is int:
            return int.__repr__(value)
        if type(value) is str:
            return _json_string(value)
        return _partition_json(_validate.as_stored(value))


# One encoder for every partition key (json.dumps with options builds one per call); its
# text is json.dumps(value, separators=(",", ":"), sort_keys=True).
_partition_json = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
_json_string = json.encoder.encode_basestring_ascii


def _check_priority(priority: object) -> int:
    if type(priority) is not int or not -32768 <= priority <= 32767:
        raise ConfigurationError(f"priority must be an int in -32768..32767 (lower runs first), not {priority!r}")
    return priority


def _check_tags(tags: Any) -> list[str]:
    if isinstance(tags, str) or not isinstance(tags, abc.Iterable) or not all(isinstance(t, str) for t in tags):
        raise ConfigurationError("tags must be a sequence of strings")
    # PostgreSQL's text cannot hold NUL, and a lone surrogate has no UTF-8: refused here,
    # not by the INSERT (which would fail the caller's whole transaction at flush).
    bad = [t for t in tags if "\x00" in t or not _validate._is_utf8(t)]
    if bad:
        raise ConfigurationError(f"tags must not hold NUL or lone surrogates: {bad!r}")
    return list(tags)


# The latest scheduled_at a delay may reach: Python's datetime ends with the year 9999,
# PostgreSQL's timestamp runs on to 294276. Past it, a row was written that psycopg cannot
# read back (listing it raised "timestamp too large"), or the INSERT failed the caller's
# transaction at flush ("timestamp out of range"), or timedelta raised OverflowError here.
# A year short of the end: the delay is added to the database's clock, not this one.
_LATEST_SCHEDULE = dt.datetime(9999, 1, 1, tzinfo=dt.timezone.utc)


# The earliest run_at: a day into year 1, so that no session TimeZone (offsets reach
# +-16 h) shows it as 1 BC, which psycopg cannot read back ("timestamp too small").
_EARLIEST_SCHEDULE = dt.datetime(1, 1, 2, tzinfo=dt.timezone.utc)


def _max_delay_seconds() -> float:
    return (_LATEST_SCHEDULE - dt.datetime.now(dt.timezone.utc)).total_seconds()


def _check_run_at(run_at: object) -> dt.datetime:
    """An absolute schedule every reader can load back: aware, and inside Python's years
    wherever it is read. Past either end PostgreSQL took the row, but every listing of it
    then failed ("timestamp too large (after year 10K)")."""
    if not isinstance(run_at, dt.datetime) or run_at.utcoffset() is None:
        raise ConfigurationError(f"run_at must be a timezone-aware datetime, not {run_at!r}")
    try:
        utc = run_at.astimezone(dt.timezone.utc)
    except OverflowError:  # its UTC instant is before year 1 or after 9999
        utc = None
    if utc is None or not _EARLIEST_SCHEDULE <= utc <= _LATEST_SCHEDULE:
        raise ConfigurationError(
            f"run_at {run_at.isoformat()} is outside {_EARLIEST_SCHEDULE.date()}..{_LATEST_SCHEDULE.date()} UTC,"
            " which Python cannot read back in every time zone")
    return run_at


def _delay_seconds(delay: object) -> float:
    """``delay=`` as seconds: a timedelta or a real number (not a bool, a string, or a
    datetime meant as ``run_at=``, which float() took or failed on with a bare TypeError)."""
    if isinstance(delay, dt.timedelta):
        return delay.total_seconds()
    if isinstance(delay, (numbers.Real, decimal.Decimal)) and not isinstance(delay, bool):
        return real_seconds(delay)
    raise ConfigurationError(
        f"delay must be a timedelta or a number of seconds, not {delay!r} (an absolute time is run_at=)")


def _timeout_seconds(timeout: object) -> float:
    """A kind's ``timeout=`` as seconds: a timedelta or a finite positive real number.

    A Decimal passed the old check and failed every attempt in the worker (its deadline,
    ``float + Decimal``, raised around the handler, which never ran); ``True`` was taken
    for one second, and a timedelta or a string raised a bare TypeError."""
    seconds = duration_seconds(timeout)  # NaN for what is no duration, an int past float's range
    if not 0 < seconds < math.inf:
        raise ConfigurationError(
            f"timeout must be a positive, finite number of seconds or a timedelta (None for no timeout), not {timeout!r}")
    return timeout if type(timeout) is int else seconds  # an int kept: "its timeout of 60s"


def _check_attempts(max_attempts: object) -> int:
    if type(max_attempts) is not int or not 1 <= max_attempts <= 1_000_000:
        raise ConfigurationError(f"max_attempts must be an int in 1..1000000, not {max_attempts!r}")
    return max_attempts


def _omitted_when_unset(type_: Any) -> Any:
    """The column's type, flagged so that an INSERT leaves the column out while the row
    does not set it (its value is then the table's NULL), instead of sending an explicit
    NULL parameter. SQLAlchemy otherwise binds a NULL for every nullable column without a
    default: 8 of this table's columns, on every row of every INSERT. An explicit None
    is still written as NULL."""
    return type_.evaluates_none()


class Base(DeclarativeBase):
    """sa-jobs' own declarative base; the app's Base and Session need not know it."""


class Job(Base):
    """A durable job: one row of ``sa_jobs.jobs``. Subclass it once per kind.

    The table's schema is ``sa_jobs``; an app that keeps the queue in another schema maps
    it with ``engine.execution_options(schema_translate_map={"sa_jobs": "other"})``.
    """

    __tablename__ = JOBS_TABLE
    __table_args__ = {"schema": DEFAULT_SCHEMA}

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    queue: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'default'"))
    args: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    state: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'available'"))
    priority: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default=text("0"))
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("20"))
    scheduled_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    attempted_at: Mapped[Optional[dt.datetime]] = mapped_column(_omitted_when_unset(DateTime(timezone=True)))
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column(_omitted_when_unset(DateTime(timezone=True)))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())
    lease_owner: Mapped[Optional[str]] = mapped_column(_omitted_when_unset(Text()))
    claim_token: Mapped[Optional[uuid.UUID]] = mapped_column(_omitted_when_unset(UUID(as_uuid=True)))
    lease_expires_at: Mapped[Optional[dt.datetime]] = mapped_column(_omitted_when_unset(DateTime(timezone=True)))
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False, server_default=text("'[]'::jsonb"))
    result: Mapped[Optional[Any]] = mapped_column(JSONB)
    tags: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False, server_default=text("'{}'"))
    meta: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    # Schema v2: the handler's last progress report, {"percent": 0-100, "message": str, "attempt": n}
    # (reports before the attempt was added have none); see admin.current_progress.
    progress: Mapped[Optional[dict[str, Any]]] = mapped_column(JSONB)
    # Schema v3: a unique job holds its key only while its state is in unique_states.
    unique_key: Mapped[Optional[str]] = mapped_column(_omitted_when_unset(Text()))
    unique_states: Mapped[Optional[list[str]]] = mapped_column(_omitted_when_unset(ARRAY(Text)))
    # Schema v4: the key a queue's partition_concurrency limit counts by (e.g. a customer).
    partition_key: Mapped[Optional[str]] = mapped_column(_omitted_when_unset(Text()))

    # eager_defaults is off: a flush fetches only the new ids (RETURNING id). The columns
    # the database fills in (state, scheduled_at, created_at, ...) load on first access
    # or with session.refresh(job). Fetching them all on every INSERT cost a quarter of the
    # client's CPU per job in a one-job transaction (RETURNING ten columns, decoding them).
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_abstract": True, "eager_defaults": False}

    # Set on each kind by __init_subclass__; None on Job itself.
    __sa_jobs_options__: ClassVar[Optional[KindOptions]] = None
    __sa_jobs_handler__: ClassVar[Optional[Handler]] = None
    # True on a base of kinds declared with __mapper_args__ = {"polymorphic_abstract": True}.
    __sa_jobs_abstract__: ClassVar[bool] = False

    def __init_subclass__(
        cls,
        *,
        kind: Optional[str] = None,
        queue: Union[str, _Inherited] = _INHERITED,
        priority: Union[int, _Inherited] = _INHERITED,
        max_attempts: Union[int, _Inherited] = _INHERITED,
        timeout: Union[float, dt.timedelta, None, _Inherited] = _INHERITED,
        backoff: Union[BackoffPolicy, _Inherited] = _INHERITED,
        tags: Union[Sequence[str], _Inherited] = _INHERITED,
        max_args_bytes: Union[int, _Inherited] = _INHERITED,
        unique: Union[Unique, None, _Inherited] = _INHERITED,
        partition_by: Union[Sequence[str], _Inherited] = _INHERITED,
        **kw: Any,
    ) -> None:
        if kw:
            _refuse_unknown_options(cls, kw)
        # An option not given is the parent kind's (cls.__sa_jobs_options__ is still the
        # nearest base's here), or KindOptions' default below Job itself. Given, it
        # replaces the parent's, None and () included (unique=None: not unique).
        given: dict[str, Any] = {
            name: value
            for name, value in (("queue", queue), ("priority", priority), ("max_attempts", max_attempts),
                                ("timeout", timeout), ("backoff", backoff), ("tags", tags),
                                ("max_args_bytes", max_args_bytes), ("unique", unique),
                                ("partition_by", partition_by))
            if value is not _INHERITED
        }
        if "tags" in given:
            given["tags"] = tuple(_check_tags(given["tags"]))
        if "partition_by" in given:
            by = given["partition_by"]
            given["partition_by"] = (by,) if isinstance(by, str) else tuple(by) if isinstance(by, abc.Iterable) else by
        parent = cls.__sa_jobs_options__
        name = kind or cls.__name__
        options = KindOptions(kind=name, **given) if parent is None else replace(parent, kind=name, **given)
        if not cls.__dict__.get("__mapper_args__", {}).get("polymorphic_abstract"):
            _check_kind_is_free(options.kind, cls)
        cls.__sa_jobs_options__ = options
        # The handler is not reset: a kind without its own runs its parent kind's
        # (attribute lookup), even one registered after the child was declared.
        if options.unique is not None:
            note_unique_kind()
        mapper_args = dict(cls.__dict__.get("__mapper_args__", {}))
        # A base of kinds marked as SQLAlchemy marks one (polymorphic_abstract) shares its
        # options and handler but is no kind: given an identity, it was one after all (its
        # rows written, listed by registered_kinds(), yet hidden from select() of itself).
        cls.__sa_jobs_abstract__ = bool(mapper_args.get("polymorphic_abstract"))
        if not cls.__sa_jobs_abstract__:
            mapper_args.setdefault("polymorphic_identity", options.kind)
        cls.__mapper_args__ = mapper_args
        _check_own_init(cls)
        super().__init_subclass__(**kw)

    def __init__(self, **args: Any) -> None:
        """Build a row for ``session.add()``; every keyword is a JSON argument of the job."""
        options = type(self).__sa_jobs_options__
        if options is None:  # pragma: no cover - polymorphic_abstract already forbids this
            raise ConfigurationError("Job is abstract: subclass it once per kind")
        self.args = self.__dict__[_ARGS_CHECKED] = _validate.json_payload(args, max_bytes=options.max_args_bytes)
        # Only columns that differ from the table's server defaults are set: every row of
        # a kind still shares one parameter shape (so add_all() batches into multi-row
        # INSERTs), and each row carries fewer placeholders for the driver to parse.
        # The database fills in the rest; they are not fetched back at flush.
        if options.queue != "default":
            self.queue = options.queue
        if options.priority != 0:
            self.priority = options.priority
        if options.max_attempts != _SERVER_DEFAULT_MAX_ATTEMPTS:
            self.max_attempts = options.max_attempts
        if options.tags:
            self.tags = list(options.tags)
        if options.partition_by:
            self.partition_key = self.__dict__[_PARTITION_DERIVED] = options.partition_key_of(self.args)
        if options.unique is not None:
            self._set_unique_key()

    def _check_assigned_args(self, options: KindOptions) -> None:
        """Before a new row is written (at flush, or by ``enqueue_many``), its args checked
        as ``Job.__init__`` checks them (plain JSON, under the kind's cap), whether assigned
        after construction or changed in place (``job.args["x"] = ...``, a nested list
        appended to): unchecked, NaN failed the INSERT with DataError (a set or a datetime
        with TypeError) and lost the caller's transaction, and an int key was written as a
        string. Walked again even when __init__ checked them (a microsecond for usual args):
        an in-place change cannot be seen otherwise."""
        d = self.__dict__
        meta = d.get("meta")
        if meta is not None:
            # Meta too (options(meta=) checked it, but not one assigned to the attribute or
            # changed in place since): NaN failed the flush with DataError, losing the
            # caller's transaction. Most jobs have none, and pay nothing.
            checked_meta = _validate.json_payload(meta, what="meta")
            if checked_meta is not meta:
                self.meta = checked_meta
        args = d.get("args")
        if args is None and d.get(_ARGS_CHECKED) is None:
            return  # no args (the table's '{}')
        if not isinstance(args, Mapping):
            raise InvalidArgsError(
                f"{type(self).__name__} (kind {options.kind!r}): args must be a mapping of JSON values,"
                f" not {type(args).__name__}")
        checked = _validate.json_payload(args, max_bytes=options.max_args_bytes)
        if checked is not args:
            self.args = checked
        d[_ARGS_CHECKED] = checked

    def _derive_partition_key(self, options: KindOptions) -> None:
        """At flush, a new row's partition key from its final args, as the unique key is:
        args set or changed in place after construction kept the key of the first ones
        (the job counted against another key's limit). A key given (``options(partition_key=)``,
        the attribute, a copy's) stays."""
        d = self.__dict__
        derived = d.get(_PARTITION_DERIVED)
        if derived is None or "args" not in d or d.get("partition_key") != derived:
            return
        try:
            if options.partition_text(d["args"]) == derived:
                return  # the usual case: unchanged since construction
        except (KeyError, TypeError):
            pass  # an arg gone, or args no mapping: partition_key_of says which
        self.partition_key = d[_PARTITION_DERIVED] = options.partition_key_of(d["args"])

    def _set_unique_key(self) -> None:
        # The base key (no period bucket: that is computed by the database at INSERT, on
        # its clock); recomputed at flush from the row's final args and queue.
        options = type(self).kind_options()
        unique = options.unique
        assert unique is not None, "only unique kinds have a unique key"
        self.unique_key = unique.base_key(options.kind, self.__dict__.get("queue") or options.queue, self.args)
        self.unique_states = list(unique.states)

    def _move_unique_key(self) -> None:
        """The key of a row whose queue ``options()`` changed.

        Only a ``by_queue`` key depends on the queue, and a row not yet written has its key
        recomputed at flush. A written row's key carries the period bucket the database
        added at INSERT: rebuilding it as at construction dropped the bucket, and a job of
        the same key in the same period was no longer a duplicate. So a written row keeps
        its bucket, and its key changes only with ``by_queue``.
        """
        unique = type(self).kind_options().unique
        assert unique is not None, "only unique kinds have a unique key"
        if sa_inspect(self).key is None:
            self._set_unique_key()
        elif unique.by_queue:
            d = self.__dict__
            if "unique_key" not in d or "args" not in d:
                # Expired (by a commit): loading them here autoflushed the queue without
                # its key, which the flush refused as a stale key, and an AsyncSession
                # cannot load outside a flush (MissingGreenlet). Moved at flush instead.
                d[_QUEUE_MOVED] = d["queue"]
                return
            d.pop(_QUEUE_MOVED, None)
            bucket = (self.unique_key or "").partition(":")[2] if unique.period is not None else ""
            self._set_unique_key()
            if bucket:
                self.unique_key = f"{self.unique_key}:{bucket}"

    def _move_key_at_flush(self) -> None:
        """``before_flush``: the key move ``options(queue=)`` left to the flush, if the
        queue is still the one it set (an expire or refresh since dropped the move)."""
        d = self.__dict__
        queue = d.pop(_QUEUE_MOVED, None)
        if queue is not None and d.get("queue") == queue:
            for name in ("unique_key", "args"):
                getattr(self, name)  # loaded, if expired: a flush may load (in an AsyncSession too)
            self._move_unique_key()

    @property
    def was_duplicate(self) -> bool:
        """True once flushed if this unique job's key was already held: the object now
        carries the existing job (id, state, ...) and no new row was written."""
        return bool(self.__dict__.get("_sa_jobs_duplicate", False))

    @property
    def was_replaced(self) -> bool:
        """True once flushed if ``on_conflict="replace"`` rewrote the existing waiting job."""
        return bool(self.__dict__.get("_sa_jobs_replaced", False))

    # ---- per-row options ---------------------------------------------------------

    def options(
        self,
        *,
        queue: Optional[str] = None,
        priority: Optional[int] = None,
        max_attempts: Optional[int] = None,
        delay: Optional[dt.timedelta | float] = None,
        run_at: Optional[dt.datetime] = None,
        tags: Optional[Sequence[str]] = None,
        meta: Optional[Mapping[str, Any]] = None,
        partition_key: Optional[str] = None,
    ) -> "Job":
        """Override this row's defaults; returns the row so it chains into ``session.add``.

        ``delay`` is measured on the database clock (``now() + delay`` at INSERT).
        ``partition_key`` sets the key a queue's partition_concurrency limit counts by.
        """
        if queue is not None:
            self.queue = _validate.queue_name(queue)
            if type(self).kind_options().unique is not None:
                self._move_unique_key()
        if priority is not None:
            self.priority = _check_priority(priority)
        if max_attempts is not None:
            self.max_attempts = _check_attempts(max_attempts)
        if delay is not None and run_at is not None:
            raise ConfigurationError("give delay or run_at, not both")
        if delay is not None or run_at is not None:
            self._check_reschedulable()
        if delay is not None:
            seconds = _delay_seconds(delay)
            if not seconds >= 0:
                raise ConfigurationError(f"delay must be >= 0 seconds, not {delay!r}")
            if seconds > _max_delay_seconds():
                raise ConfigurationError(f"delay {delay!r} runs past the year 9999, which Python cannot read back")
            if seconds > 0:  # due now is the table's default: no worker claims a 'scheduled' job
                self.scheduled_at = func.now() + dt.timedelta(seconds=seconds)  # type: ignore[assignment]
                self.state = "scheduled"
        if run_at is not None:
            self.scheduled_at = _check_run_at(run_at)
            self.state = "scheduled"
        if tags is not None:
            self.tags = _check_tags(tags)
        if meta is not None:
            self.meta = _validate.json_payload(meta, what="meta")
        if partition_key is not None:
            self.partition_key = _validate.partition_key(partition_key)
            self.__dict__.pop(_PARTITION_DERIVED, None)
        return self

    def _check_reschedulable(self) -> None:
        """A stored job's schedule is moved only while it waits. It set ``state='scheduled'``
        whatever the row's state: a completed or dead job ran again (a dead one with its
        attempts spent), and a running one ran twice (its own outcome refused, the row no
        longer running). Judged by the state as loaded: load the row with
        ``with_for_update()`` so that no worker claims it before the commit."""
        state = self.__dict__.get("state")
        if sa_inspect(self).key is not None and state is not None and state not in PENDING_STATES:
            raise ConfigurationError(
                f"job {self.__dict__.get('id')} is {state}: options(delay=/run_at=) reschedules a new or waiting job"
                " (replay a finished one with sa_jobs.retry())")

    # ---- handlers ----------------------------------------------------------------

    @classmethod
    def handler(cls, fn: Handler) -> Handler:
        """Register ``fn(ctx, **args)`` as this kind's handler (async or sync); returns ``fn``.

        A kind that subclasses this one runs ``fn`` too, unless it registers its own."""
        if cls.__sa_jobs_options__ is None:
            raise ConfigurationError("register handlers on a job kind, not on Job itself")
        if not callable(fn):
            raise ConfigurationError(f"a handler must be callable, not {fn!r}")
        name = getattr(fn, "__qualname__", repr(fn))  # a callable object or a partial has none
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            # Calling one runs none of its body: the job ended dead ("result is a generator").
            raise ConfigurationError(f"handler {name} is a generator function (it yields): its body would never run")
        try:
            signature = inspect.signature(fn)
        except (ValueError, TypeError) as exc:  # a builtin without a signature
            raise ConfigurationError(f"handler {name} has no signature to call it by: {exc}") from None
        params = list(signature.parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise ConfigurationError(f"handler {name} must take the JobContext as its first argument")
        cls.__sa_jobs_handler__ = fn
        return fn

    @classmethod
    def kind_options(cls) -> KindOptions:
        if cls.__sa_jobs_options__ is None:
            raise ConfigurationError("Job itself has no kind options")
        return cls.__sa_jobs_options__

    def __repr__(self) -> str:
        # Only what is loaded: a repr must not query (nor fail in an AsyncSession) for the
        # columns a flush leaves to the database.
        d = self.__dict__
        return f"<{type(self).__name__} id={d.get('id')} state={d.get('state', '?')} attempt={d.get('attempt', '?')}>"


def _check_own_init(cls: type) -> None:
    """Wrap a kind's own ``__init__`` (or a mixin's ahead of Job) so that one which never
    ran ``Job.__init__`` is refused where the job is built. Such a job lacked its kind's
    queue, priority, max_attempts, tags and partition key: ``session.add`` wrote it to the
    table's queue 'default', which no worker of the kind's queue looks at. Called before
    SQLAlchemy instruments the class, so its constructor calls the wrapper."""
    import functools

    owner = next(c for c in cls.__mro__ if "__init__" in vars(c))
    if owner is not cls and issubclass(owner, Job):
        return  # a parent kind's (checked there) or Job's own
    init = vars(owner)["__init__"]
    if getattr(init, "__sa_jobs_checked_init__", False):
        return

    @functools.wraps(init)
    def __init__(self: Job, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        if _ARGS_CHECKED not in self.__dict__:
            raise ConfigurationError(
                f"{type(self).__name__}.__init__ did not call super().__init__(**args): the job would lack its"
                " kind's queue, priority, max_attempts, tags and keys (and its args their check)")

    __init__.__sa_jobs_checked_init__ = True  # type: ignore[attr-defined]
    setattr(cls, "__init__", __init__)


def _refuse_unknown_options(cls: type, kw: Mapping[str, Any]) -> None:
    """A class keyword that is no kind option: SQLAlchemy passed it on to
    ``object.__init_subclass__`` ("takes no keyword arguments", naming neither the keyword
    nor the option meant) after mapping the class, so a corrected class then only warned
    of the kind's reassignment. Refused first, unless another base class of ``cls`` (a
    mixin of the app's) takes class keywords of its own."""
    import difflib

    options = [name for name, p in inspect.signature(Job.__init_subclass__).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for base in cls.__mro__[1:]:
        if (base is not Job and "__init_subclass__" in vars(base)
                and base.__module__.partition(".")[0] not in ("sqlalchemy", "typing", "builtins", "abc")):
            return
    hints = []
    for key in kw:
        close = difflib.get_close_matches(key, options, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    raise ConfigurationError(f"{cls.__name__}: unknown job kind option(s) {', '.join(hints)};"
                             f" the options are {', '.join(options)}")


def _check_kind_is_free(kind: str, cls: type) -> None:
    """Refuse a second class of an already mapped kind name, before mapping it.

    SQLAlchemy only warns ("Reassigning polymorphic association") and lets the later class
    take the identity: the first one's rows then load as the second class, and a worker
    that finds its kinds sees the second, without the first's handler. The same class
    declared again (its module and name unchanged: a module reload, or a class statement
    in a function run twice) replaces it, as before.
    """
    held = Job.__mapper__.polymorphic_map.get(kind)
    if held is None or held.class_ is Job:
        return
    old = held.class_
    if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ConfigurationError(
            f"job kind {kind!r} is declared twice: by {old.__module__}.{old.__qualname__} and by"
            f" {cls.__module__}.{cls.__qualname__}; give one of them another kind= name")


def job_table() -> Table:
    """The jobs ``Table`` (``Job.__table__``, typed as such) for Core statements."""
    return cast(Table, Job.__table__)


def registered_kinds() -> dict[str, type[Job]]:
    """Every job kind mapped in this process, by kind name."""
    return {
        identity: m.class_
        for identity, m in Job.__mapper__.polymorphic_map.items()
        if m.class_ is not Job
    }


def is_registered_kind(kind: str) -> bool:
    """Whether ``kind`` is mapped in this process: one dict lookup, where
    :func:`registered_kinds` builds the whole mapping (per job, it cost the metrics' hot path
    O(declared kinds) for every job of a kind this process does not declare)."""
    mapper = Job.__mapper__.polymorphic_map.get(kind)
    return mapper is not None and mapper.class_ is not Job


# Unique kinds' rows are inserted ON CONFLICT by a before_flush hook on every Session.
register_session_hook()
# SQLAlchemy's bulk INSERT paths that would skip Job.__init__ or that hook are refused.
register_bulk_guards(Job)

