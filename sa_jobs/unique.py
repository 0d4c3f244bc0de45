"""Unique jobs: at most one row per key among a kind's rows in chosen states, enforced by
the database's unique partial index ``jobs_unique_idx``, never by a racy SELECT.

A kind opts in with ``unique=Unique(...)``::

    class SendDigest(Job, kind="send_digest",
                     unique=Unique(by=("user_id",), period=timedelta(hours=1))):
        pass

Every row of the kind carries ``unique_key`` (a digest of the kind, the queue if chosen,
the chosen args as canonical JSON and, with a period, the period's bucket on the database
clock) and ``unique_states``. The index covers a row only while ``state = ANY
(unique_states)``, so a completed job frees its key unless ``completed`` is one of the states.

``session.add()`` of a duplicate must neither raise inside the caller's transaction nor
block other enqueues. A ``before_flush`` hook on every Session inserts new unique rows
itself with ``INSERT ... ON CONFLICT (kind, unique_key) WHERE <predicate> DO NOTHING
RETURNING *``; on a conflict it loads the existing job into the caller's object (or
replaces the existing job's args and schedule, with ``on_conflict="replace"``) and
attaches it as persistent, so no INSERT is flushed for it. ``job.was_duplicate`` says
which happened. The object is noted as created in the current transaction, as the unit of
work notes the rows it INSERTs: if that transaction or savepoint rolls back, the object
goes back to transient with the caller's values, as a plain job would, and can be re-added.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ._validate import as_stored
from .errors import ConfigurationError
from .states import ALL_STATES, PENDING_STATES

DEFAULT_UNIQUE_STATES: tuple[str, ...] = ("scheduled", "available", "running", "retryable")
ON_CONFLICT = ("return", "replace")
# A replace never rewrites a job a worker holds, nor a finished one: only waiting rows.
REPLACEABLE_STATES: tuple[str, ...] = PENDING_STATES
# The columns a replace rewrites (partition_key too: it derives from the args).
_REPLACED = ("args", "queue", "priority", "max_attempts", "scheduled_at", "state", "tags", "meta", "partition_key")
# A conflicting row can leave the unique states between our INSERT and our SELECT (it
# completed); the INSERT is then retried. Bounded, since each round sees newer data.
_MAX_ROUNDS = 8


@dataclass(frozen=True)
class Unique:
    """How a kind's jobs are made unique.

    ``by``: the arg names that make up the key (``None``: all args; ``()``: none, one job
    per kind). ``by_queue``: include the row's queue. ``period``: a duration of whole seconds; the key
    holds within one bucket of that length (buckets start at multiples of ``period``
    since the Unix epoch, on the database clock at INSERT: ``now()``, the transaction's
    start). ``states``: the states in which a row holds its key. ``on_conflict``:
    ``"return"`` (the caller's object becomes the existing job) or ``"replace"`` (the
    existing job, if still waiting, takes the new args, queue, priority, max_attempts, tags,
    meta and schedule).
    """

    by: Optional[Sequence[str]] = None
    by_queue: bool = False
    period: Optional[dt.timedelta] = None
    states: Sequence[str] = DEFAULT_UNIQUE_STATES
    on_conflict: str = "return"

    def __post_init__(self) -> None:
        if self.by is not None:
            if isinstance(self.by, str) or not all(isinstance(a, str) and a for a in self.by):
                raise ConfigurationError(f"Unique(by=...) takes a sequence of arg names, not {self.by!r}")
            object.__setattr__(self, "by", tuple(self.by))
        if self.period is not None:
            # Whole seconds: the bucket's length is an integer number of seconds in SQL, and
            # int() cut a period of 1.5 s to buckets of 1 s.
            if (not isinstance(self.period, dt.timedelta) or self.period.total_seconds() < 1
                    or self.period % dt.timedelta(seconds=1)):
                raise ConfigurationError(
                    f"Unique(period=...) must be a timedelta of whole seconds, at least 1, not {self.period!r}")
        if isinstance(self.states, str) or not self.states:
            raise ConfigurationError("Unique(states=...) takes a non-empty sequence of states")
        bad = [s for s in self.states if s not in ALL_STATES]
        if bad:
            raise ConfigurationError(f"Unique(states=...): unknown state(s) {bad}; use {', '.join(ALL_STATES)}")
        # Canonical order, so equal sets give equal rows.
        object.__setattr__(self, "states", tuple(s for s in ALL_STATES if s in self.states))
        if "running" in self.states and "available" not in self.states:
            # The claim moves available jobs to running without looking at their keys (it
            # cannot skip a row in the index's place): two jobs of one key waited
            # available, outside the index, and the claim that took the second failed on
            # jobs_unique_idx, and with it every claim of the queue, for good.
            raise ConfigurationError(
                f"Unique(states={self.states!r}): a key held while running must be held while available too"
                " (the claim cannot wait for a running job's key); add 'available', or run one job at a time"
                " per key with partition_by= and a queue's partition_concurrency=1")
        if self.on_conflict not in ON_CONFLICT:
            raise ConfigurationError(f"Unique(on_conflict=...) must be one of {ON_CONFLICT}, not {self.on_conflict!r}")
        if type(self.by_queue) is not bool:
            raise ConfigurationError("Unique(by_queue=...) must be a bool")

    @property
    def period_seconds(self) -> Optional[int]:
        return None if self.period is None else int(self.period.total_seconds())

    def base_key(self, kind: str, queue: str, args: Mapping[str, Any]) -> str:
        """The key without its period bucket: sha256 of canonical JSON, 32 hex characters.

        The args are hashed as jsonb stores them (``-0.0`` as ``0.0``, ``1e16`` as the int
        ``10000000000000000``): hashed as given, two jobs whose stored args a worker reads
        alike held two keys, and the key of a stored job's loaded args was not its own.

        Every name in ``by`` must be in ``args`` (as a kind's ``partition_by``): a name the
        args lack (a typo, ``user`` for ``user_id``) left it out of the key, so every job
        of the kind shared one key and all but the first were dropped as duplicates."""
        if self.by is None:
            chosen = dict(args)
        else:
            missing = [a for a in self.by if a not in args]
            if missing:
                raise ConfigurationError(f"kind {kind!r} is unique by {list(self.by)}, but args lack {missing}"
                                         " (pass None for an argument that may be absent)")
            chosen = {a: args[a] for a in self.by}
        material = {"kind": kind, "queue": queue if self.by_queue else None, "args": as_stored(chosen)}
        text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---- SQLAlchemy: the key as an INSERT value, the ON CONFLICT statement ------------------


def key_sql(base: str, period: str) -> str:
    """``unique_key`` as SQL text, from the SQL expressions ``base`` and ``period`` (seconds,
    NULL for none): the base, plus ``:<bucket>`` of ``now()`` with a period. The text
    statements' form of :func:`key_expression`; both compute the bucket alike."""
    return (f"CASE WHEN {period} IS NULL THEN {base}"
            f" ELSE {base} || ':' || floor(extract(epoch FROM now()) / {period})::bigint END")


def key_expression(base: str, period_seconds: Optional[int]) -> Any:
    """``unique_key`` as SQL: the base, plus ``:<bucket>`` of ``now()`` with a period."""
    from sqlalchemy import BigInteger, cast, func, literal

    if period_seconds is None:
        return literal(base)
    # Bound as bigint, as the other paths do: a bare int is bound as an INTEGER, and a
    # period past 2**31 - 1 seconds (68 years) failed the caller's flush, "integer out of range".
    bucket = cast(func.floor(func.extract("epoch", func.now()) / literal(period_seconds, BigInteger)), BigInteger)
    return func.concat(literal(base), literal(":"), bucket)


def _predicate() -> Any:
    from sqlalchemy import text

    from .schema import UNIQUE_PREDICATE

    return text(UNIQUE_PREDICATE)


def insert_statement(table: Any, values: Mapping[str, Any]) -> Any:
    """INSERT ``values`` ON CONFLICT on the unique index DO NOTHING, RETURNING the row; no
    row comes back on a conflict.

    A replace is not ``DO UPDATE ... WHERE <waiting>``: that locks the conflicting row even
    where the WHERE keeps it from being updated, so a replace that met a running job held
    the job's row until the enqueuing transaction ended, and the worker's heartbeats and
    completion waited for it. :func:`replace_statement` follows a conflict instead."""
    from sqlalchemy.dialects.postgresql import insert

    stmt = insert(table).values(**values)
    stmt = stmt.on_conflict_do_nothing(index_elements=[table.c.kind, table.c.unique_key], index_where=_predicate())
    return stmt.returning(*table.c)


def replace_statement(table: Any, values: Mapping[str, Any], kind: str, key: Any) -> Any:
    """UPDATE the waiting job holding ``key`` with the replaced columns of ``values``,
    RETURNING it; no row, and no lock on it, if the holder is running or finished (a
    claim of it in flight is waited for, and its row may stay locked: a rare window, where
    ``DO UPDATE`` locked every running holder)."""
    from sqlalchemy import update

    return (update(table)
            .where(table.c.kind == kind, table.c.unique_key == key, _predicate(),
                   table.c.state.in_(REPLACEABLE_STATES))
            .values({c: values.get(c) for c in _REPLACED})  # no partition_key given: the new job has none
            .returning(*table.c))


def existing_statement(table: Any, kind: str, key: Any) -> Any:
    from sqlalchemy import select

    return select(*table.c).where(table.c.kind == kind, table.c.unique_key == key, _predicate())


# ---- the Session hook ------------------------------------------------------------------

# Set in ``Session.info`` by enqueue paths that write job rows outside the unit of work
# (this hook, ``enqueue_many``), so commit watchers such as ``testing.inline`` see them.
ENQUEUED_INFO_KEY = "sa_jobs.enqueued"


def note_enqueued(session: Any) -> None:
    """Mark ``session``'s transaction as having written job rows past the unit of work."""
    session.info[ENQUEUED_INFO_KEY] = True


_INSERTABLE = ("queue", "args", "state", "priority", "max_attempts", "scheduled_at", "tags", "meta", "partition_key")

# Set once a kind with unique= is declared (see model.Job.__init_subclass__): until then
# no job added while a flush prepares needs inserting at once.
_unique_kinds_declared = False


def note_unique_kind() -> None:
    global _unique_kinds_declared
    _unique_kinds_declared = True


def _before_flush(session: Any, flush_context: Any, instances: Any) -> None:
    """New jobs, before anything is sent: their final args are checked (assigned or
    changed in place since construction), keys derived from them, and unique kinds' rows
    inserted ON CONFLICT."""
    from .model import Job

    new = []
    for o in session.new:
        if isinstance(o, Job):
            options = type(o).__sa_jobs_options__
            if options is not None:
                o._check_assigned_args(options)
                if options.partition_by:
                    o._derive_partition_key(options)
                if options.unique is not None:
                    new.append(o)
    session.info.pop(_DEFERRED_INFO_KEY, None)  # left by a flush that failed: those went transient
    if not new:
        return
    if instances is None:  # flush(objects) may leave the freeing change out of this flush
        new = _defer_keys_this_flush_frees(session, new)
    if not new:
        return
    from sqlalchemy import inspect

    # Keyed order (then add order): two transactions enqueueing the same keys wait for
    # each other's uncommitted rows in the same order, and cannot deadlock. Every wait
    # for a key is taken in that order: a held key is read at once (a read waits for
    # nothing), and a key freed meanwhile is inserted then, before any higher key. Only
    # the rewrite of a waiting holder (a replace kind) locks a row, so those come in a
    # second pass, after every INSERT, as in enqueue_many: key by key, a flush that
    # rewrote key a's holder then waited for key b, inserted by a bulk call that was
    # about to rewrite a.
    new.sort(key=lambda o: (type(o).kind_options().kind, o.unique_key or "", inspect(o).insert_order or 0))
    to_rewrite = [plan for plan in map(_plan_unique, new) if not _settle_in_order(session, plan)]
    for plan in to_rewrite:
        _settle_replace(session, plan)
    # The rows left session.new: say so for whoever watches this transaction's commit.
    note_enqueued(session)


# Set in ``Session.info`` by the hook: new unique jobs whose key a deleted or changed job
# of the same flush may free, inserted once the flush has written that change.
_DEFERRED_INFO_KEY = "sa_jobs.unique_deferred"
# The columns whose change can take a stored job out of jobs_unique_idx.
_KEY_HOLDING = ("state", "unique_key", "unique_states")
_NOT_LOADED = object()


def _defer_keys_this_flush_frees(session: Any, new: list[Any]) -> list[Any]:
    """The new unique jobs to insert now; those whose key this flush may free, put aside.

    The hook inserts before the unit of work writes anything, so a job deleted
    (``session.delete(old)``) or moved out of its unique states (``old.state =
    "cancelled"``) in the same flush still held its key: the new job was taken for a
    duplicate of ``old``, which the flush then deleted or finished, and no job was left.
    Such a job (same kind, same base key, or a key not loaded) is expunged here and
    added back from ``after_flush`` (:func:`_insert_deferred`), once the change is
    written; it is then inserted, or settled against the key's holder, as usual. Jobs of
    a kind with no such change in the flush, the usual case, are untouched."""
    from sqlalchemy import inspect

    from .model import Job

    freed: dict[Optional[str], set[Optional[str]]] = {}  # kind -> base keys; None: unknown, any
    changed = [(o, True) for o in session.deleted if isinstance(o, Job)]
    changed += [(o, False) for o in session.dirty if isinstance(o, Job)]
    for obj, deleted in changed:
        state = inspect(obj)
        if not deleted and (not any(key in state.committed_state and state.attrs[key].history.has_changes()
                                    for key in _KEY_HOLDING) or _keeps_its_key(state)):
            continue
        # The key the row holds in the database: the committed one if the flush changes it.
        key = state.committed_state.get("unique_key", state.dict.get("unique_key", _NOT_LOADED))
        if key is None:
            continue  # the row holds no key
        base = key.partition(":")[0] if isinstance(key, str) else None
        options = type(obj).__sa_jobs_options__
        kind = state.dict.get("kind") or (options.kind if options is not None else None)
        freed.setdefault(kind, set()).add(base)
    if not freed:
        return new
    now, later = [], []
    for obj in new:
        options = type(obj).kind_options()
        bases = freed.get(options.kind, set()) | freed.get(None, set())
        if None in bases or (bases and _base_of(obj) in bases):
            later.append(obj)
        else:
            now.append(obj)
    if later:
        for obj in later:
            session.expunge(obj)
        session.info[_DEFERRED_INFO_KEY] = later
    return now


def _keeps_its_key(state: Any) -> bool:
    """Whether a stored job's change leaves it holding the same key, before and after (a
    move between two of its unique states: available to scheduled). Such a job is no
    freed key: put aside, a replace then rewrote the row after the flush had written the
    change, where it used to be the other way round (the job postponed, with the new args):
    the row ended 'available' while the object said 'scheduled'. Unknown (a column not
    loaded): False, and the new job is put aside."""
    committed, now = state.committed_state, state.dict

    def holds(values: Any) -> bool:
        job_state, states = values.get("state", _NOT_LOADED), values.get("unique_states", _NOT_LOADED)
        return isinstance(job_state, str) and isinstance(states, (list, tuple)) and job_state in states

    before = {k: committed.get(k, now.get(k, _NOT_LOADED)) for k in _KEY_HOLDING}
    return (holds(before) and holds(now) and isinstance(before["unique_key"], str)
            and before["unique_key"] == now.get("unique_key"))


def _base_of(obj: Any) -> str:
    options = type(obj).kind_options()
    d = obj.__dict__
    return options.unique.base_key(options.kind, d.get("queue") or options.queue, d["args"])


def _insert_deferred(session: Any, flush_context: Any) -> None:
    """``after_flush``: add back the jobs :func:`_defer_keys_this_flush_frees` put aside;
    :func:`_added_during_flush` inserts each at once, in the flush's transaction. (Were
    that listener off, they would stay pending, and the commit's next flush insert them.)"""
    deferred = session.info.pop(_DEFERRED_INFO_KEY, ())
    if not deferred:
        return
    session.info[_AFTER_FLUSH_INFO_KEY] = True
    try:
        for obj in deferred:
            session.add(obj)
    finally:
        session.info.pop(_AFTER_FLUSH_INFO_KEY, None)


# Set in ``Session.info`` while :func:`_insert_deferred` adds its jobs: the flush has written
# every change of the session's objects (see :func:`_load_replaced`).
_AFTER_FLUSH_INFO_KEY = "sa_jobs.inserting_after_flush"


def _added_during_flush(session: Any, obj: Any) -> None:
    """``transient_to_pending``: a unique job added while a flush prepares, by a
    ``before_flush`` listener of the app's (enqueueing jobs for the rows it changed, say).

    A listener registered after ours runs after :func:`_before_flush` has looked at
    ``session.new``, so its jobs went to the ORM's plain INSERT: a duplicate raised
    IntegrityError in the caller's transaction, and a kind with a period wrote its key
    without the bucket, which no job enqueued the usual way ever meets. They are inserted
    here instead, at once, as the hook would. Jobs added while the flush executes (from a
    mapper event, which SQLAlchemy warns against) stay pending for the next flush's hook;
    those added after it (``after_flush``) go in at once too, in the same transaction.
    """
    # Session._flushing / _warn_on_events are SQLAlchemy's own flags (a flush prepares /
    # executes); read with defaults so that a release without them disables only this.
    if (not _unique_kinds_declared or not getattr(session, "_flushing", False)
            or getattr(session, "_warn_on_events", True)):
        return
    from .model import Job

    if not isinstance(obj, Job) or _unique_of(obj) is None:
        return
    obj._check_assigned_args(type(obj).kind_options())
    plan = _plan_unique(obj)
    if not _settle_in_order(session, plan):
        _settle_replace(session, plan)
    note_enqueued(session)


def _unique_of(obj: Any) -> Optional[Unique]:
    options = type(obj).__sa_jobs_options__
    return None if options is None else options.unique


@dataclass
class _Plan:
    """One new unique job's INSERT, as the hook writes it."""

    obj: Any
    values: dict[str, Any]
    key: Any  # the unique_key as SQL (a period's bucket is the database's)


def _plan_unique(obj: Any) -> _Plan:
    options = type(obj).__sa_jobs_options__
    unique = options.unique
    d = obj.__dict__
    queue = d.get("queue") or options.queue
    key = key_expression(_base_of(obj), unique.period_seconds)
    values: dict[str, Any] = {c: d[c] for c in _INSERTABLE if c in d and d[c] is not None}
    values.update(kind=options.kind, unique_key=key, unique_states=list(unique.states))
    if unique.on_conflict == "replace":
        # A replace must write every replaced column, defaults included.
        values.setdefault("queue", queue)
        values.setdefault("state", "available")
        values.setdefault("priority", options.priority)
        values.setdefault("max_attempts", options.max_attempts)
        values.setdefault("tags", list(options.tags))
        values.setdefault("meta", {})
        from sqlalchemy import func

        values.setdefault("scheduled_at", func.now())
    return _Plan(obj, values, key)


def _try_insert(session: Any, plan: _Plan) -> bool:
    """INSERT the plan's row unless its key is held; whether it was (and is attached)."""
    from .model import Job

    row = session.execute(insert_statement(Job.__table__, plan.values)).mappings().first()
    if row is None:
        return False
    _attach(session, plan.obj, row, duplicate=False, replaced=False)
    return True


def _settle_in_order(session: Any, plan: _Plan) -> bool:
    """The plan's INSERT, and if its key is held, what can be settled without a lock:
    whether the plan is settled (else a waiting holder awaits a replace's rewrite).

    A key found held is read at once; one freed meanwhile (its holder finished) is
    inserted now, in the flush's keyed order. Read in a later pass, as it used to be,
    a freed key was inserted after the flush's higher keys: two flushes of two keys
    could each wait for the other's uncommitted row, and PostgreSQL ended one with a
    deadlock. A replace kind's holder that is not waiting (running) is not rewritten:
    the job is its duplicate, as the second pass would find."""
    from .model import Job

    options = type(plan.obj).__sa_jobs_options__
    replace = options.unique.on_conflict == "replace"
    for _ in range(_MAX_ROUNDS):
        if _try_insert(session, plan):
            return True
        row = session.execute(existing_statement(Job.__table__, options.kind, plan.key)).mappings().first()
        if row is not None:
            if replace and row["state"] in REPLACEABLE_STATES:
                return False
            _attach(session, plan.obj, row, duplicate=True, replaced=False)
            return True
    raise ConfigurationError(  # pragma: no cover - the key flapped in and out of its states 8 times
        f"could not enqueue unique job {options.kind!r}: its key kept changing state")


def _settle_replace(session: Any, plan: _Plan) -> None:
    """A replace kind's plan whose key a waiting job held (:func:`_settle_in_order`, the
    second pass): rewrite that holder, or take the holder's row if it no longer waits;
    INSERT again if the key was freed meanwhile."""
    from .model import Job

    table = Job.__table__
    obj = plan.obj
    kind = type(obj).__sa_jobs_options__.kind
    for _ in range(_MAX_ROUNDS):
        row = session.execute(replace_statement(table, plan.values, kind, plan.key)).mappings().first()
        if row is not None:  # an existing waiting job was rewritten
            _attach(session, obj, row, duplicate=True, replaced=True)
            return
        row = session.execute(existing_statement(table, kind, plan.key)).mappings().first()
        if row is not None:
            _attach(session, obj, row, duplicate=True, replaced=False)
            return
        if _try_insert(session, plan):
            return
    raise ConfigurationError(  # pragma: no cover - the key flapped in and out of its states 8 times
        f"could not enqueue unique job {kind!r}: its key kept changing state")


def _attach(session: Any, obj: Any, row: Any, *, duplicate: bool, replaced: bool) -> None:
    """Load ``row`` (inserted, or the holder's) into ``obj`` and attach it as persistent."""
    from sqlalchemy.orm import make_transient_to_detached

    from .model import Job

    table = Job.__table__
    d = obj.__dict__
    # The caller's values, put back if this transaction (or savepoint) rolls back.
    original = {c.key: d[c.key] for c in table.c if c.key in d}
    session.expunge(obj)
    for column in table.c:
        setattr(obj, column.key, row[column.key])
    make_transient_to_detached(obj)
    d[_ORIGINAL] = original
    obj._sa_jobs_duplicate = duplicate
    obj._sa_jobs_replaced = replaced
    identity = session.identity_map.get(make_key(obj))
    if identity is None:
        session.add(obj)  # persistent: its row exists, nothing more to INSERT
    elif replaced:
        _load_replaced(session, identity, row)
    _created_in_transaction(session, obj)


def _load_replaced(session: Any, held: Any, row: Any) -> None:
    """Load a replace's new values into ``held``, the session's object of the rewritten row.

    The UPDATE bypasses the unit of work, so ``held`` (an earlier object of the same key in
    this flush, or one a query loaded) kept the old args, and a query in the same
    transaction returned it with them. Loaded as committed values, with no SELECT (an
    AsyncSession could not lazy-load them); a column the caller changed on ``held`` and has
    not flushed keeps its change, which the flush then writes over the replace. ``held`` is
    noted as altered in the current transaction, as the unit of work notes the rows it
    UPDATEs, so a rollback of this savepoint expires it and it reloads the restored row.
    """
    from sqlalchemy import inspect
    from sqlalchemy.orm.attributes import set_committed_value

    state = inspect(held)
    # After the flush (a job put aside for a freed key), a change of the caller's to
    # ``held`` is written already, under the replace: keeping it left the object saying
    # what the row no longer held ('scheduled', the row 'available').
    flushed = session.info.get(_AFTER_FLUSH_INFO_KEY, False)
    for key in _REPLACED:
        if flushed or key not in state.committed_state:  # no pending change of the caller's
            set_committed_value(held, key, row[key])
    transaction = session._transaction
    if transaction is not None and state not in transaction._new:
        transaction._dirty[state] = True


def _created_in_transaction(session: Any, obj: Any) -> None:
    """Tell the Session that ``obj`` was INSERTed in its current transaction.

    The unit of work notes each state it INSERTs in the innermost transaction's ``_new``
    (``Session._register_altered``); a released savepoint hands its ``_new`` to its parent,
    a commit of the outermost drops it, and a rollback of the savepoint or transaction
    (``SessionTransaction._restore_snapshot``) expunges those states to *transient*. Our
    rows bypass the unit of work, so note ours the same way: on a rollback they become
    transient like a plain job (``_restore_original`` then puts the caller's values
    back), and ``session.add()`` enqueues them again. A duplicate left detached (its
    row's object was already in the identity map) is noted too: it goes transient as
    well, so a re-add evaluates it again rather than attaching it to a row that may be
    gone. The transaction is read after the hook's INSERT, which autobegan one if needed.
    """
    from sqlalchemy import inspect

    transaction = session._transaction
    if transaction is not None:
        transaction._new[inspect(obj)] = True


_ORIGINAL = "_sa_jobs_original"


def _restore_original(session: Any, obj: Any) -> None:
    """``persistent_to_transient``: a rollback discarded a row the hook wrote for ``obj``.

    Put back the column values the caller's object had before the hook loaded the row into
    it, and forget ``was_duplicate``/``was_replaced``: the stale id, state and (for a
    duplicate) the other job's args must not leak into a re-add, which evaluates the
    duplicate/replace semantics again. Only fires on rollbacks, never at flush."""
    d = getattr(obj, "__dict__", None)
    if d is None:
        return
    original = d.pop(_ORIGINAL, None)
    if original is None:
        return
    from .model import job_table

    for column in job_table().c:
        key = column.key
        if key in original:
            d[key] = original[key]
        else:
            d.pop(key, None)
    d.pop("_sa_jobs_duplicate", None)
    d.pop("_sa_jobs_replaced", None)


def make_key(obj: Any) -> Any:
    from sqlalchemy import inspect

    return inspect(obj).key


def register_session_hook() -> None:
    """Listen on every Session (sync, and the one inside each AsyncSession), once."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    if not event.contains(Session, "before_flush", _before_flush):
        event.listen(Session, "before_flush", _before_flush)
    if not event.contains(Session, "transient_to_pending", _added_during_flush):
        event.listen(Session, "transient_to_pending", _added_during_flush)
    if not event.contains(Session, "after_flush", _insert_deferred):
        event.listen(Session, "after_flush", _insert_deferred)
    if not event.contains(Session, "persistent_to_transient", _restore_original):
        event.listen(Session, "persistent_to_transient", _restore_original)
