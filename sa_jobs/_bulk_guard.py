"""Refuse SQLAlchemy's bulk INSERT paths that would write a wrong job row.

A job row is right only when built by ``Job.__init__`` (args checked as JSON; the kind's
queue, priority, max_attempts, tags, partition key and unique key filled in) and, for a
unique kind, written by the flush hook's ``INSERT ... ON CONFLICT``. Three SQLAlchemy
paths skip one or the other, and wrote rows no worker of the kind's queue ever ran, or
duplicates, or failed the caller's transaction:

- an ORM INSERT of a kind (``session.execute(insert(Kind), [dicts])``, ``.values()``,
  ``.returning()``, ``select(Kind).from_statement(insert(Kind))``): refused from the
  ``do_orm_execute`` event, before it runs;
- ``Session.bulk_insert_mappings(Kind, ...)``: refused;
- ``Session.bulk_save_objects`` of new jobs of a unique kind (no ON CONFLICT, no period
  bucket) or with a ``delay=`` (SQL the bulk path sends as a parameter): refused. Other
  jobs, built by ``Job.__init__``, are written as ``add_all`` would write them.

An ORM UPDATE of a kind (``update(Kind).values(args=...)``, or by primary key with a list
of dicts) that sets what a row's unique key or partition key derives from (``args``,
``kind``; ``queue`` for a ``by_queue`` key) is refused too: the keys are computed in Python
(a hash of canonical JSON) and no UPDATE recomputes them, so the row kept the keys of its
old args (a job of the new args was no duplicate of it; one of the old args was).

The two legacy bulk methods run no event at all, so they are wrapped on the ``Session``
class (once, keeping SQLAlchemy's method for everything but job kinds). A Core
``insert(Job.__table__)`` stays the explicit low-level path: it writes exactly the
columns it is given.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional

from sqlalchemy import Insert, event, inspect
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.sql.elements import ClauseElement

from .errors import ConfigurationError
from .unique import note_enqueued

# The mapped Job class, set by register_bulk_guards (model.py imports this module).
_job: Optional[type] = None


def _kind_name(cls: type) -> str:
    options = getattr(cls, "__sa_jobs_options__", None)
    return cls.__name__ if options is None else f"{cls.__name__} (kind {options.kind!r})"


def _refusal(cls: type, path: str, why: str) -> ConfigurationError:
    name = "YourKind" if cls is _job else cls.__name__
    return ConfigurationError(
        f"{path} of {_kind_name(cls)} is not an enqueue path: {why}. Enqueue with"
        f" session.add_all([{name}(**args), ...]) or sa_jobs.enqueue_many(session, {name}, rows);"
        " insert(Job.__table__) is the low-level path that writes exactly the columns given")


_BYPASSES_INIT = ("it bypasses Job.__init__, so the row would take the table's queue 'default'"
                  " instead of the kind's, miss its priority, max_attempts, tags, partition and"
                  " unique keys (duplicates written), and its args would not be checked")


def _job_class(entity: Any) -> Optional[type]:
    """The Job class that ``entity`` (a class or a Mapper) maps, else None."""
    cls = getattr(entity, "class_", entity)
    return cls if isinstance(cls, type) and _job is not None and issubclass(cls, _job) else None


def _refuse_orm_insert(state: ORMExecuteState) -> None:
    """``do_orm_execute``: refuse an ORM INSERT into a job kind. Runs for every ORM
    statement of the app, so a non-INSERT returns after one attribute test."""
    if not state.is_insert:
        return
    cls = _job_class(state.bind_mapper)
    if cls is None:
        return
    statement = state.statement
    if not isinstance(statement, Insert):
        # select(Kind).from_statement(insert(...)): the INSERT inside decides; a Core
        # insert(Job.__table__) whose rows load as Kind is the low-level path.
        inner = getattr(statement, "element", None)
        if not isinstance(inner, Insert) or _job_class(inner.entity_description.get("entity")) is None:
            return
    raise _refusal(cls, "An ORM INSERT (session.execute(insert(Kind), ...))", _BYPASSES_INIT)


def _key_columns(cls: type) -> set[str]:
    """The columns the unique and partition keys of ``cls`` and of its subkinds (an UPDATE
    of a parent kind, or of ``Job``, reaches their rows) derive from."""
    columns: set[str] = set()
    mapper: Any
    for mapper in inspect(cls).self_and_descendants:
        options = getattr(mapper.class_, "__sa_jobs_options__", None)
        if options is None:
            continue
        if options.unique is not None or options.partition_by:
            columns.update(("args", "kind"))
        if options.unique is not None and options.unique.by_queue:
            columns.add("queue")
    return columns


def _set_columns(state: ORMExecuteState) -> set[str]:
    """The names an UPDATE sets: its ``values()`` (``ordered_values()`` too), and the keys of
    the parameter dicts of an UPDATE by primary key."""
    statement = state.statement
    keys = [*(getattr(statement, "_values", None) or ()),
            *(k for k, _ in getattr(statement, "_ordered_values", None) or ())]
    params = state.parameters
    for row in params if isinstance(params, (list, tuple)) else [params] if params else []:
        keys.extend(row)
    return {key if isinstance(key, str) else str(getattr(key, "key", key)) for key in keys}


def _refuse_orm_key_update(state: ORMExecuteState) -> None:
    """``do_orm_execute``: refuse an ORM UPDATE of a job kind that sets a column its keys
    derive from. Returns after one attribute test for any statement that is not an UPDATE."""
    if not state.is_update:
        return
    cls = _job_class(state.bind_mapper)
    if cls is None:
        return
    stale = sorted(_set_columns(state) & _key_columns(cls))
    if stale:
        raise ConfigurationError(
            f"An ORM update(...) setting {', '.join(stale)} of {_kind_name(cls)} would leave each row's unique"
            " or partition key computed from what it was before (the keys are hashed from the args in"
            " Python; no SQL update recomputes them). To run a job with other args, cancel it (sa_jobs.admin.cancel)"
            " and enqueue a new one; update(Job.__table__) is the low-level path that writes exactly the"
            " columns given, keys included")


def _stale_key_edits(obj: Any) -> list[str]:
    """The columns a key of the stored job ``obj`` derives from that the caller changed
    on it and the flush would write without the key: ``args`` or ``kind`` of a keyed kind
    (or into one), ``queue`` of a ``by_queue`` kind unless ``options(queue=)`` moved the key."""
    state: Any = inspect(obj)
    changed = state.committed_state.keys() & {"args", "kind", "queue"}
    if not changed:
        return []
    options = type(obj).__sa_jobs_options__
    unique = options.unique if options is not None else None
    keyed = unique is not None or bool(options is not None and options.partition_by)
    attrs = state.attrs
    stale = []
    if "args" in changed and keyed and attrs.args.history.has_changes():
        stale.append("args")
    if "kind" in changed and attrs.kind.history.has_changes():
        into = inspect(type(obj)).base_mapper.polymorphic_map.get(state.dict.get("kind"))
        if keyed or (into is not None and _key_columns(into.class_)):
            stale.append("kind")
    if "queue" in changed and unique is not None and unique.by_queue and attrs.queue.history.has_changes():
        d = state.dict
        # The key is the queue's (moved by options(queue=), or the queue set is the one the
        # job was on: an expired queue's history says changed whatever the value).
        moved = "args" in d and options is not None and (
            (d.get("unique_key") or "").partition(":")[0] == unique.base_key(options.kind, d["queue"], d["args"]))
        if not moved:  # options(queue=) recomputes the key for the queue it sets
            stale.append("queue")
    return stale


def _check_edited_args(obj: Any) -> None:
    """Args set on a stored job are checked as ``Job.__init__`` checks them (plain JSON,
    under the kind's cap): unchecked, NaN failed the flush with DataError and lost the
    caller's transaction. Raises InvalidArgsError before the flush begins."""
    state: Any = inspect(obj)
    if "args" in state.committed_state and state.attrs.args.history.has_changes():
        obj._check_assigned_args(type(obj).__sa_jobs_options__)


def _refuse_stale_key_edits(session: Session, flush_context: Any, instances: Any) -> None:
    """``before_flush``: refuse a stored job whose args or kind (or a by_queue key's queue)
    was changed through the ORM (``job.args = ...``, ``session.merge(...)``). Its row would
    keep the keys of the old values, as an ORM UPDATE's would. Raised before the flush
    begins, so the caller's transaction stays usable. Looks only at the session's modified
    objects (a flush of new rows has none), and at a job's columns only if it is one."""
    if _job is None:
        return
    for obj in session.dirty:
        if not isinstance(obj, _job):
            continue
        committed = instance_state(obj).committed_state
        if "args" not in committed and "kind" not in committed and "queue" not in committed:
            continue  # the usual edit: state, priority, schedule, ...
        if "queue" in committed:
            # options(queue=) of an expired job: its key, moved here (loading it).
            obj._move_key_at_flush()  # type: ignore[attr-defined]
        stale = _stale_key_edits(obj)
        if not stale:
            _check_edited_args(obj)
            continue
        if stale == ["queue"]:
            fix = ("move it with job.options(queue=...), which recomputes the key (and keeps its"
                   " period's bucket)")
        else:
            fix = ("to run a job with other args, cancel it (sa_jobs.admin.cancel) and enqueue a new one;"
                   " update(Job.__table__) is the low-level path that writes exactly the columns given,"
                   " keys included")
        state: Any = instance_state(obj)
        raise ConfigurationError(
            f"job {state.identity[0]} of {_kind_name(type(obj))}: its {', '.join(stale)} changed through"
            " the ORM, but its row would keep the unique or partition key computed from what it was before"
            " (the keys are hashed from the args in Python when the job is built). Undo the change"
            f" (session.expire(job), or roll back), and {fix}")


def _guard_bulk_insert_mappings(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def bulk_insert_mappings(self: Session, mapper: Any, mappings: Any, *args: Any, **kw: Any) -> None:
        cls = _job_class(mapper)
        if cls is not None:
            raise _refusal(cls, "session.bulk_insert_mappings()", _BYPASSES_INIT)
        return original(self, mapper, mappings, *args, **kw)

    bulk_insert_mappings.__sa_jobs_guard__ = True  # type: ignore[attr-defined]
    return bulk_insert_mappings


def _check_saved_objects(objects: list[Any]) -> bool:
    """Refuse the new jobs a bulk INSERT cannot write as add_all would; whether any is new."""
    new = False
    for obj in objects:
        cls = _job_class(type(obj))
        if cls is None or inspect(obj).key is not None:  # not a job, or an UPDATE
            continue
        new = True
        options = cls.__sa_jobs_options__  # type: ignore[attr-defined]
        if options is not None and options.unique is not None:
            raise _refusal(cls, "session.bulk_save_objects()", (
                "a unique kind is written by the flush hook's INSERT ... ON CONFLICT (and its key"
                " takes the period's bucket there); a bulk INSERT raised IntegrityError on a"
                " duplicate, inside your transaction"))
        if isinstance(obj.__dict__.get("scheduled_at"), ClauseElement):
            raise _refusal(cls, "session.bulk_save_objects()", (
                "a job with delay= carries SQL (now() + the delay) that a bulk INSERT cannot send"))
        if options is not None:
            # No before_flush runs here: what it does for a new job (args assigned since
            # construction checked, the partition key from the final args), done here.
            obj._check_assigned_args(options)
            if options.partition_by:
                obj._derive_partition_key(options)
    return new


def _guard_bulk_save_objects(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def bulk_save_objects(self: Session, objects: Iterable[object], *args: Any, **kw: Any) -> None:
        objects = list(objects)  # checked in full before anything is written
        new_jobs = _check_saved_objects(objects)
        original(self, objects, *args, **kw)
        if new_jobs:  # past the unit of work: tell commit watchers (testing.inline) as enqueue_many does
            note_enqueued(self)

    bulk_save_objects.__sa_jobs_guard__ = True  # type: ignore[attr-defined]
    return bulk_save_objects


def register_bulk_guards(job: type) -> None:
    """Guard every Session (sync, and the one inside each AsyncSession), once."""
    global _job
    _job = job
    for listener in (_refuse_orm_insert, _refuse_orm_key_update):
        if not event.contains(Session, "do_orm_execute", listener):
            event.listen(Session, "do_orm_execute", listener)
    if not event.contains(Session, "before_flush", _refuse_stale_key_edits):
        event.listen(Session, "before_flush", _refuse_stale_key_edits)
    for name, guard in (("bulk_insert_mappings", _guard_bulk_insert_mappings),
                        ("bulk_save_objects", _guard_bulk_save_objects)):
        method = getattr(Session, name)
        if not getattr(method, "__sa_jobs_guard__", False):
            setattr(Session, name, guard(method))
