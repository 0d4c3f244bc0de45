"""The ``sa-jobs`` command line: worker, migrate, retry, check, demo, and the operator's
commands: jobs list|show|retry|cancel|delete, queues [pause|resume], dead replay, prune.

Operator commands print a table by default and JSON with ``--json``; malformed ids, states,
queue and kind names and ages, a schema not at this sa-jobs' version and database errors
are refused with one clear line (exit 2: nothing done); ids named that no job has, or no job
in a state the action accepts, are reported on stderr (exit 1: the command ran).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib
import logging
import os
import re
import signal
import sys
import threading
from array import array
from typing import Callable, Iterator, Optional, Sequence

import anyio

from . import _validate, schema as schema_mod
from ._url import ENV_VAR, database_url_from_env
from .errors import ConfigurationError, SaJobsError


# An operator command waits neither for ever on a server that accepts connections and never
# answers (a host behind a dead proxy or a full firewall queue) nor on rows or a table a long
# transaction holds: it fails with one line instead. 0 waits without a limit.
CONNECT_TIMEOUT_ENV = "SA_JOBS_CONNECT_TIMEOUT"
LOCK_TIMEOUT_ENV = "SA_JOBS_LOCK_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 10  # seconds (libpq's connect_timeout is whole seconds)
DEFAULT_LOCK_TIMEOUT = 30.0  # seconds


def _database_url(args: argparse.Namespace) -> str:
    url = args.database_url or database_url_from_env()
    if not url:
        # A usage error (exit 2), as every other refusal; SystemExit(message) exited 1.
        raise ConfigurationError(f"no database URL; pass --database-url or set {ENV_VAR}")
    return _with_timeouts(url, args)


def _timeout_setting(args: argparse.Namespace, name: str, env: str, parse) -> Optional[float]:  # type: ignore[no-untyped-def]
    """The option's value, else the environment variable's, else None (not given)."""
    value = getattr(args, name, None)
    if value is None and os.environ.get(env, "").strip():
        try:
            value = parse(os.environ[env])
        except argparse.ArgumentTypeError as exc:
            raise ConfigurationError(f"${env}: {exc}") from None
    return value


def _with_timeouts(url: str, args: argparse.Namespace) -> str:
    """``url`` with the command's connect and lock timeouts (for the commands that take the
    options): ``--connect-timeout`` / ``$SA_JOBS_CONNECT_TIMEOUT``, else the URL's own
    ``connect_timeout``, else 10 s; ``--lock-timeout`` / ``$SA_JOBS_LOCK_TIMEOUT``, else a
    ``lock_timeout`` the URL's ``options`` (or PGOPTIONS) set, else 30 s. Both go into the
    URL, so every connection of the command has them: its engine and its raw psycopg ones."""
    from ._url import _parse

    if not hasattr(args, "connect_timeout"):
        return url  # the worker: its own connect timeouts
    parsed = _parse(url)
    query = dict(parsed.query)
    connect = _timeout_setting(args, "connect_timeout", CONNECT_TIMEOUT_ENV, _connect_timeout)
    if connect is not None or "connect_timeout" not in query:
        query["connect_timeout"] = str(DEFAULT_CONNECT_TIMEOUT if connect is None else connect)
    if hasattr(args, "lock_timeout"):
        lock = _timeout_setting(args, "lock_timeout", LOCK_TIMEOUT_ENV, _lock_timeout)
        options = query.get("options") or ""
        options = " ".join(options) if isinstance(options, tuple) else options
        if lock is not None or "lock_timeout" not in options + os.environ.get("PGOPTIONS", ""):
            seconds = DEFAULT_LOCK_TIMEOUT if lock is None else lock
            millis = 0 if seconds == 0 else min(2**31 - 1, max(1, int(seconds * 1000)))
            query["options"] = f"{options} -c lock_timeout={millis}".strip()
    return parsed.set(query=query).render_as_string(hide_password=False)


# Upper bounds of the seconds options: past them a value is a slip (1e300, a number of
# milliseconds), not a wish; 0, where taken, means no limit, and --shutdown-grace takes inf.
_HOUR = 3600
_DAY = 86400
MAX_CONNECT_TIMEOUT = _HOUR
MAX_LOCK_TIMEOUT = _DAY
# A worker's slots per queue: it starts a task a slot, and `--concurrency 99999999999` (a
# slip) grew it to 24 GB until the kernel's OOM killer ended it.
MAX_WORKER_CONCURRENCY = 10_000


def _connect_timeout(value: str) -> int:
    """Whole seconds, 0 to MAX_CONNECT_TIMEOUT (0: no limit), as libpq's ``connect_timeout``."""
    value = value.strip()
    if not value.isdigit() or not value.isascii() or int(value) > MAX_CONNECT_TIMEOUT:
        raise argparse.ArgumentTypeError(f"invalid connect timeout {value!r}: whole seconds, 0 (no limit)"
                                         f" or more, at most {MAX_CONNECT_TIMEOUT}")
    return int(value)


def _lock_timeout(value: str) -> float:
    """Seconds, 0 to MAX_LOCK_TIMEOUT (0: no limit)."""
    number = _validate.decimal_number(value)
    if number is None or not 0 <= number <= MAX_LOCK_TIMEOUT:
        raise argparse.ArgumentTypeError(f"invalid lock timeout {value!r}: seconds, 0 (no limit)"
                                         f" or more, at most {MAX_LOCK_TIMEOUT}")
    return number


def _parse_queues(values: Optional[Sequence[str]], default: int) -> Optional[dict[str, int]]:
    if not values:
        return None
    queues: dict[str, int] = {}
    for item in values:
        name, _, limit = item.partition("=")
        number = _validate.decimal_integer(limit) if limit else default
        if number is None or not 1 <= number <= MAX_WORKER_CONCURRENCY:
            raise ConfigurationError(f"--queue {item!r}: the concurrency after '=' must be an integer"
                                     f" from 1 to {MAX_WORKER_CONCURRENCY}")
        queues[name] = number
    return queues


# The signals on which `sa-jobs worker` drains (a second one releases its jobs and exits).
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def _cmd_worker(args: argparse.Namespace) -> int:
    from .worker import Worker

    sys.path.insert(0, ".")
    modules = []
    for module in args.modules:
        if not all(part.isidentifier() for part in module.split(".")):
            # importlib raised TypeError (a leading dot: relative) or ValueError (empty).
            path = "/" in module or os.sep in module or module.endswith(".py")
            raise ConfigurationError(f"{module!r} is not a module's name: give"
                                     + (" a module's name such as myapp.jobs, not a file's path" if path
                                        else " the dotted name of a module to import, such as myapp.jobs"))
        try:
            modules.append(importlib.import_module(module))
        except ImportError as exc:
            raise ConfigurationError(f"cannot import {module!r}: {exc}") from None
    maintenance = _maintenance_of(modules)
    observer = None
    if args.metrics_port is not None:
        from . import metrics

        observer = metrics.serve_worker_metrics(args.metrics_port, host=args.metrics_host, schema=args.schema,
                                                database_url=_database_url(args))
    worker = Worker(
        _database_url(args),
        queues=_parse_queues(args.queue, args.concurrency),
        concurrency=args.concurrency,
        schema=args.schema,
        lease=args.lease,
        poll_interval=args.poll_interval,
        maintenance_interval=args.maintenance_interval,
        shutdown_grace=args.shutdown_grace,
        statement_timeout=args.statement_timeout,
        observer=observer,
        maintenance=maintenance,
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                # SIGHUP too (a closed terminal or ssh session): Python's default for it
                # ended the process at once, mid-job, its jobs left running until their
                # lease expired. It drains like SIGTERM; a worker has no config to reload.
                with anyio.open_signal_receiver(*_STOP_SIGNALS) as signals:
                    received = 0
                    async for signum in signals:
                        received += 1
                        if received == 1:
                            logging.getLogger("sa_jobs").info(
                                "%s: draining for up to %.0fs (send again to release jobs and exit now)",
                                signal.Signals(signum).name, worker.shutdown_grace,
                            )
                            worker.request_stop()
                        else:
                            worker.release_running()

            tg.start_soon(watch_signals)
            await worker.run()
            tg.cancel_scope.cancel()

    anyio.run(main)
    left = worker._threads_left_behind()
    if left:
        # Python joins every thread at exit: a sync handler that ignores ctx.cancelled kept
        # the process alive past the grace period, and past a second signal, until it returned.
        logging.getLogger("sa_jobs").warning("exiting with %d sync handler(s) still running in their threads", left)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _maintenance_of(modules: Sequence[object]) -> list[object]:
    """Extra maintenance services declared by the worker's modules: ``SA_JOBS_PERIODIC``
    (Periodic declarations, fired by one PeriodicJobs service) and ``SA_JOBS_MAINTENANCE``
    (services such as ``Pruner(...)``)."""
    from .maintenance.leader import maintenance_services
    from .periodic import PeriodicJobs, collect

    services: list[object] = []
    periodics = collect(modules)
    if periodics:
        services.append(PeriodicJobs(periodics))
    for module in modules:
        extra = getattr(module, "SA_JOBS_MAINTENANCE", None) or ()
        for service in maintenance_services(extra, f"{getattr(module, '__name__', module)}.SA_JOBS_MAINTENANCE"):
            # Once, if two modules show it (a star import): listed twice, it ran twice a tick.
            if not any(service is s for s in services):
                services.append(service)
    return services


def _cmd_migrate(args: argparse.Namespace) -> int:
    if args.sql:
        if args.json:
            raise ConfigurationError("--json does not go with --sql (it prints the DDL itself)")
        sys.stdout.write(schema_mod.install_sql(args.schema, from_version=args.from_version))
        return 0
    if args.from_version:
        raise ConfigurationError("--from-version goes with --sql (migrate itself reads the installed version)")
    lock_timeout = schema_mod.DEFAULT_LOCK_TIMEOUT if args.ddl_lock_timeout is None else args.ddl_lock_timeout
    version = schema_mod.install(_database_url(args), args.schema, lock_timeout=lock_timeout,
                                 lock_retries=args.ddl_lock_retries)
    if args.json:
        _print_json({"schema": args.schema, "version": version})
    else:
        print(f"sa-jobs schema {args.schema!r} is at version {version}")
    return 0


def _require_schema(args: argparse.Namespace) -> None:
    """Refuse an operator command on a queue schema that is missing, older or newer than
    this sa-jobs (SchemaVersionError naming the fix), as the worker does at start; its
    queries would otherwise die on an undefined table or column, with a driver traceback."""
    from ._url import to_conninfo

    schema_mod.check_version(to_conninfo(_database_url(args)), _validate.schema_name(args.schema))


def _engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine

    from . import _validate
    from ._url import sqlalchemy_url

    schema = _validate.schema_name(args.schema)
    _require_schema(args)
    # jsonb numbers exact (`jobs show --json`): see _json_loads_exact.
    engine = create_engine(sqlalchemy_url(_database_url(args)), json_deserializer=_json_loads_exact)
    if schema != schema_mod.DEFAULT_SCHEMA:
        engine = engine.execution_options(schema_translate_map={schema_mod.DEFAULT_SCHEMA: schema})
    return engine


def _cmd_retry(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from .admin import retry_many

    engine = _engine(args)
    with Session(engine) as session, session.begin():
        done = retry_many(session, args.ids)
    missing = sorted(set(args.ids) - set(done))
    if args.json:  # the shape of `jobs retry --json`
        _print_json({"retried": sorted(done), "not_retried": missing})
        return 1 if missing else 0
    for job_id in done:
        print(f"job {job_id}: available")
    for job_id in missing:
        print(f"job {job_id}: not found in a replayable state", file=sys.stderr)
    return 1 if missing else 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .drift import check_drift

    differences = check_drift(_database_url(args), args.schema)
    if args.json:
        _print_json({"schema": args.schema, "drift": differences})
        return 1 if differences else 0
    for line in differences:
        print(line)
    if not differences:
        print(f"sa-jobs schema {args.schema!r}: no drift")
    return 1 if differences else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    # The demo prints its own story; the worker's routine INFO lines would bury it.
    if args.log_level.upper() == "INFO":
        logging.getLogger("sa_jobs").setLevel(logging.WARNING)

    # A given server gets the commands' connect timeout: one that never answers (a dead proxy,
    # a silent service on that port) held the demo for ever. The embedded one is local.
    url = args.database_url or database_url_from_env()
    return run_demo(_with_timeouts(url, args) if url else None, metrics_port=args.metrics_port)


# ---- operator commands ---------------------------------------------------------------


def _json_default(value: object) -> object:
    import datetime as dt
    import uuid

    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json_loads_exact(text: str | bytes) -> object:
    """jsonb as stored: a number with a fraction or an exponent as a Decimal. As a float,
    one past its range became Infinity (which is not JSON) and a long one lost digits."""
    import decimal
    import json

    return json.loads(text, parse_float=decimal.Decimal)


def _dumps(value: object, *, ensure_ascii: bool = True, indent: str = "") -> str:
    """``json.dumps(value, indent=2)`` that writes a Decimal as the number it holds: the
    json module can only write one by way of a float."""
    import decimal
    import json

    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = (f"{inner}{json.dumps(str(k), ensure_ascii=ensure_ascii)}: "
                 f"{_dumps(v, ensure_ascii=ensure_ascii, indent=inner)}" for k, v in value.items())
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, (list, tuple)) and value:
        if all(type(v) is int for v in value):
            # A bulk action's ids: str() each, where a json.dumps() each took 2.2 s for a
            # million (after the work was done, and a Ctrl-C then lost the whole result).
            return "[\n" + ",\n".join(inner + str(v) for v in value) + f"\n{indent}]"
        items = (inner + _dumps(v, ensure_ascii=ensure_ascii, indent=inner) for v in value)
        return "[\n" + ",\n".join(items) + f"\n{indent}]"
    if isinstance(value, decimal.Decimal) and value.is_finite():
        return str(value)  # JSON's number syntax: 12.50, -0.0, 2.5E-400
    return json.dumps(value, default=_json_default, ensure_ascii=ensure_ascii)


def _print_json(value: object) -> None:
    print(_dumps(value))


# Control characters (C0, DEL, C1) and the bidirectional overrides and isolates.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\\x1b``, ``\\t``, ``\\u202e``).

    Error messages, unique keys and args are job data (an exception's text can quote user
    input): printed raw, an escape sequence in them cleared the operator's screen, set
    the terminal's title or reordered the text shown."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _cell(value: object) -> str:
    import datetime as dt

    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _printable(str(value))


def format_table(rows: Sequence[dict], columns: Sequence[str], numeric: Sequence[str] = ()) -> str:
    """Rows as an aligned text table; numbers right-aligned.

    A column is numeric when it is named in ``numeric`` or its values are ints, none
    counting (``-``): a limit column mixing ``12`` and ``-`` was left-aligned, and one
    all ``-`` would flip alignment with the data."""

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    right = [c in numeric or (any(is_int(r.get(c)) for r in rows)
                              and all(r.get(c) is None or is_int(r.get(c)) for r in rows)) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, right)).rstrip()

    return "\n".join([line([c.upper() for c in columns]), *(line(row) for row in cells)])


class Progress:
    """A progress bar on stderr for long bulk operations (on a terminal, or when forced)."""

    def __init__(self, label: str, enabled: Optional[bool] = None, width: int = 30) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.width = width
        self.done = 0  # the last count reported: what an interrupted run had done
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        self.done = done
        if not self.enabled:
            return
        fraction = 1.0 if total <= 0 else min(1.0, done / total)
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        percent = int(fraction * 100)  # rounded down: 100% only once done
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{total} {percent:3d}%")
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _filter(args: argparse.Namespace, ids: Sequence[int] = ()):  # type: ignore[no-untyped-def]
    from .admin import JobFilter

    return JobFilter(
        ids=tuple(ids), queues=tuple(args.queue or ()), kinds=tuple(args.kind or ()),
        states=tuple(args.state or ()), older_than=args.older_than, newer_than=args.newer_than,
    )


def _cmd_jobs_list(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from .admin import list_jobs

    engine = _engine(args)
    with Session(engine) as session:
        rows = list_jobs(session, _filter(args), limit=args.limit)
    if args.json:
        _print_json(rows)
    elif rows:
        print(format_table(rows, ("id", "kind", "queue", "state", "attempt", "max_attempts", "created_at",
                                  "finished_at", "error")))
    else:
        print("no jobs match", file=sys.stderr)
    _warn_if_unknown_names(engine, args, matched=bool(rows))
    return 0


_NAMES_SHOWN = 20  # existing kinds or queues a warning names at most


def _warn_if_unknown_names(engine, args: argparse.Namespace, *, matched: bool) -> None:  # type: ignore[no-untyped-def]
    """Say on stderr which ``--kind`` / ``--queue`` given no job has (nor, for a queue, a
    setting; nor a kind this process declares), naming those there are: a mistyped name
    matched nothing, and `jobs cancel --kind mial` said "0 job(s) cancelled", exit 0, as of
    a kind with nothing to cancel. Not refused (the command ran as given; its exit code
    and --json are unchanged).

    Run after the command's output. A name some match had cannot be unknown: with one name
    and a match, nothing is read. Else one EXISTS a name (which reads the whole table only
    for a name no job has: the case warned of), and for a warning the names there are
    (one scan). Best effort: a database error or Ctrl-C here leaves the command's result
    and exit code as they were, without the hint."""
    from sqlalchemy import exists, select
    from sqlalchemy.orm import Session

    from .admin import _jobs, _queues_table
    from .model import registered_kinds

    given = [("kind", _jobs.c.kind, list(dict.fromkeys(getattr(args, "kind", None) or ()))),
             ("queue", _jobs.c.queue, list(dict.fromkeys(getattr(args, "queue", None) or ())))]
    if not any(names and not (matched and len(names) == 1) for _, _, names in given):
        return
    kinds = registered_kinds()
    try:
        with Session(engine) as session:
            for what, column, names in given:
                if not names or (matched and len(names) == 1):
                    continue
                # A kind (or a kind's queue) this process declares is known before its first
                # job: an app or a test that runs main() with its kinds imported.
                declared = set(kinds) if what == "kind" else {k.kind_options().queue for k in kinds.values()}
                unknown = [n for n in names if n not in declared
                           and not session.execute(select(exists().where(column == n))).scalar()]
                settings: list[str] = []
                if unknown and what == "queue":
                    queues = _queues_table(session)
                    settings = list(session.scalars(select(queues.c.name)))
                    unknown = [n for n in unknown if n not in settings]
                if not unknown:
                    continue
                there = sorted(set(session.scalars(select(column).distinct().order_by(column)
                                                   .limit(_NAMES_SHOWN + 1))) | set(settings))
                shown = ", ".join(_printable(n) for n in there[:_NAMES_SHOWN])
                if len(there) > _NAMES_SHOWN:
                    shown += ", ..."
                for name in unknown:
                    if what == "kind":
                        print(f"sa-jobs: warning: no job has kind {name!r}"
                              f" ({'kinds with jobs: ' + shown if shown else 'no job has any kind: there are no jobs'})",
                              file=sys.stderr)
                    else:
                        print(f"sa-jobs: warning: no job and no queue setting names queue {name!r}"
                              f" ({'queues: ' + shown if shown else 'there are no jobs and no queue settings'})",
                              file=sys.stderr)
    except (Exception, KeyboardInterrupt):  # noqa: BLE001 - a hint, not the command
        return


def _cmd_jobs_show(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from .admin import show_job
    from .errors import JobNotFoundError

    with Session(_engine(args)) as session:
        try:
            row = show_job(session, args.id)
        except JobNotFoundError as exc:
            # Exit 1, as `jobs retry|cancel|delete 999999`: the command ran and the job named
            # is not there; 2 is for a command refused (a malformed id, a database error).
            print(f"sa-jobs: {exc}", file=sys.stderr)
            return 1
    if args.json:
        _print_json(row)
        return 0
    width = max(len(k) for k in row)
    for key, value in row.items():
        if isinstance(value, (dict, list)):
            # Non-ASCII as it is (an address, a name), not \u escapes; JSON escapes the controls.
            text = _dumps(value, ensure_ascii=False)
            if key == "errors" and isinstance(value, list) and value:
                # An entry the worker did not write (SQL, another producer) as its JSON:
                # e.get() failed on it with a traceback.
                text = "\n".join(f"#{e.get('attempt')} {e.get('at', '')}: {e.get('error')}" if isinstance(e, dict)
                                 else _dumps(e, ensure_ascii=False) for e in value)
                # Where the last attempt failed: the traceback the worker stored with its error.
                last = value[-1].get("traceback") if isinstance(value[-1], dict) else None
                if last:
                    text += "\n" + str(last).rstrip("\n")
            lines = [_printable(line) for line in text.splitlines()]
            text = ("\n" + " " * (width + 2)).join(lines)
        else:
            text = _cell(value)
        print(f"{key.ljust(width)}  {text}")
    return 0


_BULK = 1000  # ids per transaction in bulk actions


def _bulk(args: argparse.Namespace, verb: str, action, *, acts_on: Sequence[str],  # type: ignore[no-untyped-def]
          skip_locked: bool = False) -> int:
    """Apply ``action(session, ids) -> done ids`` to the given ids or the filter's matches,
    ``--batch`` ids per transaction, with a progress bar; report what was not done.

    By filter, each batch's transaction lists its next matches under their row locks
    (FOR UPDATE; SKIP LOCKED for ``skip_locked``) and acts on those: ids listed at the
    start and acted on later by id alone were acted on whatever they had become meanwhile
    (a job a worker claimed was cancelled by ``--state available``, a dead job replayed
    and completed was replayed again by ``dead replay``). Only rows in the states the
    action acts on (``acts_on``) match, and so are locked: `jobs retry --kind K` waited for every
    transaction holding a running job of K (a handler's ctx.transaction(), a heartbeat),
    or deadlocked with one. The matches are those of the run's start (see _list_matches):
    memory is 8 bytes a match, and one batch of rows."""
    from sqlalchemy.orm import Session

    from .admin import matching_ids

    where = _filter(args, args.ids)
    if where.empty:
        raise ConfigurationError(f"jobs {verb}: give job ids or at least one filter (--queue, --kind, --state, --older-than)")
    by_filter = not dataclasses.replace(where, ids=()).empty
    if args.limit is not None and not by_filter:
        raise ConfigurationError(f"jobs {verb}: --limit caps a filter's matches; with job ids alone, name fewer ids")
    for state in where.states:
        if state not in acts_on:
            raise ConfigurationError(f"--state {state}: no job in that state can be {verb}"
                                     f" (this acts on {', '.join(acts_on)})")
    if by_filter:
        # A filter's matches are its rows in a state the action acts on: `--limit 3` took
        # the three oldest rows of any state (finished ones, acting on none), and every row
        # it could not act on was read and reported as not done, a line each.
        where = dataclasses.replace(where, states=where.states or tuple(acts_on))
    engine = _engine(args)
    named = list(dict.fromkeys(args.ids))
    done: list[int] = []
    missing: list[int] = []
    listed = 0
    progress = Progress(f"{verb} ", args.progress)
    interrupted = False
    try:
        # By filter, the matches are listed once, when the run begins (8 bytes an id): listed
        # anew batch by batch, a job that came to match while the run went on was acted on
        # too, past the total announced: a waiting job a worker completed meanwhile was
        # replayed by `jobs retry --kind K` (run twice), and `jobs cancel --queue Q` chased
        # the jobs the app went on enqueueing, for as long as it did. Each batch still acts
        # only on those of its ids that match then (under their row locks). Inside the try:
        # Ctrl-C while a long listing runs (or waits for a lock) says that nothing was done
        # and prints the --json result, as it does a moment later.
        matches = _list_matches(engine, where, args.limit) if by_filter else array("q", named)
        total = len(matches)
        progress(0, total)
        for start in range(0, total, args.batch):
            chunk = matches[start:start + args.batch].tolist()
            for attempt in range(1, _BATCH_ATTEMPTS + 1):
                try:
                    with Session(engine) as session:
                        session.begin()
                        if by_filter:
                            chunk_where = dataclasses.replace(where, ids=tuple(chunk))
                            targets = matching_ids(session, chunk_where, lock=True, skip_locked=skip_locked)
                        else:
                            targets = chunk
                        acted = list(action(session, targets)) if targets else []
                        # Ctrl-C waits for the COMMIT and its count: raised out of a COMMIT the
                        # server had done, the batch was left out of both. Before it, the batch
                        # rolls back.
                        with _ctrl_c_deferred():
                            session.commit()
                            done.extend(acted)
                            missing.extend(set(chunk) - set(acted))
                            listed += len(chunk)
                    break
                except Exception as exc:
                    if attempt == _BATCH_ATTEMPTS or not _deadlocked(exc):
                        raise
            progress(listed, max(total, listed))
    except KeyboardInterrupt:
        # Ctrl-C: the batches committed so far stay done (the current one rolled back); say
        # how many, not a traceback. Ids not reached are not reported as refused.
        interrupted = True
        named = []
    except Exception as exc:
        # A batch that failed (its lock timeout, a lost connection) rolled back; those
        # before it committed: say how many, before main reports the error. With --json,
        # the result so far and the error's line: stdout was empty, and a script could not
        # tell which jobs had been done.
        progress.close()
        if done:
            print(f"sa-jobs: stopped after {len(done)} job(s) {verb}", file=sys.stderr)
        message = _error_line(exc)
        if args.json and message is not None:
            _print_json({verb: sorted(done), "not_" + verb: sorted(set(missing)), "error": message})
        raise
    progress.close()
    # An id named with a filter it does not match is reported too.
    missing = sorted(set(missing) | (set(named) - set(done) if by_filter else set()))
    if args.json:
        _print_json({verb: sorted(done), "not_" + verb: missing, **({"interrupted": True} if interrupted else {})})
    else:
        print(f"{len(done)} job(s) {verb}")
        for job_id in missing:
            print(f"job {job_id}: not {verb} (no such job, or not in a state that allows it)", file=sys.stderr)
    if by_filter and not interrupted:
        _warn_if_unknown_names(engine, args, matched=total > 0)
    if interrupted:
        print(f"sa-jobs: interrupted after {len(done)} job(s) {verb}; run it again to go on", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
    return 1 if missing and args.ids else 0


# A batch the server aborted to end a deadlock (or a serialization failure) rolled back,
# having done nothing: it is tried again, up to this many times in all. A worker's completer
# writes a batch of outcomes row by row in the order its jobs ended, where a bulk batch
# locks its rows in id order: a completion holding a later row and waiting for an earlier
# one the batch holds made the whole command fail with "deadlock detected".
_BATCH_ATTEMPTS = 5
_DEADLOCK_STATES = ("40P01", "40001")  # deadlock_detected, serialization_failure


def _deadlocked(exc: BaseException) -> bool:
    """Whether ``exc`` is the server's abort of a transaction to end a deadlock (it rolled back)."""
    return getattr(getattr(exc, "orig", exc), "sqlstate", None) in _DEADLOCK_STATES


_LIST_PAGE = 50_000  # ids per statement when a bulk action lists its matches


def _list_matches(engine, where, limit: Optional[int]) -> array[int]:  # type: ignore[no-untyped-def]
    """The ids matching ``where`` now (at most ``limit``), oldest first, as a compact array:
    read a page at a time, each page one short statement (no transaction held open, no
    lock) that returns its ids as one array (900,000 ids in 0.4 s; as rows through the
    ORM, 3.6 s)."""
    from sqlalchemy import func, select
    from sqlalchemy.dialects.postgresql import aggregate_order_by

    from .admin import _jobs

    ids: array[int] = array("q")
    after: Optional[int] = None
    with engine.connect() as connection:
        while limit is None or len(ids) < limit:
            size = _LIST_PAGE if limit is None else min(_LIST_PAGE, limit - len(ids))
            query = select(_jobs.c.id).where(*where.where()).order_by(_jobs.c.id).limit(size)
            if after is not None:
                query = query.where(_jobs.c.id > after)
            page = query.subquery()
            chunk = connection.execute(select(func.array_agg(aggregate_order_by(page.c.id, page.c.id)))).scalar() or []
            connection.rollback()  # each page its own short transaction
            ids.extend(chunk)
            if len(chunk) < size:
                break
            after = chunk[-1]
    return ids


def _cmd_jobs_retry(args: argparse.Namespace) -> int:
    from .admin import REPLAYABLE_STATES, retry_many

    return _bulk(args, "retried", retry_many, acts_on=REPLAYABLE_STATES)


def _cmd_jobs_cancel(args: argparse.Namespace) -> int:
    from .admin import CANCELLABLE_STATES, cancel_many

    return _bulk(args, "cancelled", lambda session, ids: list(cancel_many(session, ids)), acts_on=CANCELLABLE_STATES)


def _cmd_jobs_delete(args: argparse.Namespace) -> int:
    from .admin import DELETABLE_STATES, delete_many

    # As delete_many: rows another transaction holds are skipped, not waited for.
    return _bulk(args, "deleted", delete_many, acts_on=DELETABLE_STATES, skip_locked=True)


def _cmd_dead_replay(args: argparse.Namespace) -> int:
    if not args.kind and not args.all_kinds:
        raise ConfigurationError("dead replay: give --kind KIND (repeatable) or --all-kinds")
    args.state = ["dead"]
    args.ids = []
    from .admin import REPLAYABLE_STATES, retry_many

    return _bulk(args, "replayed", retry_many, acts_on=REPLAYABLE_STATES)


def _cmd_queues(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from .admin import queue_overview
    from .states import ALL_STATES

    with Session(_engine(args)) as session:
        rows = queue_overview(session)
    if args.json:
        _print_json(rows)
    elif rows:
        limits = ("concurrency", "partition_concurrency")  # right-aligned also when every queue has none
        print(format_table(rows, ("queue", *ALL_STATES, "paused", *limits, "rate"), numeric=(*ALL_STATES, *limits)))
    else:
        print("no queues yet", file=sys.stderr)
    return 0


def _cmd_queue_pause(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from .admin import set_queue_paused

    paused = args.queue_action == "pause"
    engine = _engine(args)
    with Session(engine) as session, session.begin():
        set_before = _queue_row_exists(session, args.name)
        set_queue_paused(session, args.name, paused)
    _warn_if_unknown_queue(engine, args.name, set_before)
    if args.json:
        _print_json({"queue": args.name, "paused": paused})
    else:
        print(f"queue {args.name}: {'paused' if paused else 'resumed'}")
    return 0


def _cmd_queue_limit(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from .admin import QueueLimits, format_rate, parse_rate, queue_limits, set_queue_limits

    if args.clear and (args.concurrency, args.partition_concurrency, args.rate) != (None, None, None):
        raise ConfigurationError("queues limit: --clear removes every limit: give it alone, or set limits without it")
    engine = _engine(args)
    with Session(engine) as session, session.begin():
        set_before = _queue_row_exists(session, args.name)
        if args.clear:
            limits = QueueLimits()
        else:
            current = queue_limits(session, args.name, lock=True)  # two runs at once keep both changes
            limits = QueueLimits(
                concurrency=_keep_or_set(current.concurrency, args.concurrency, "--concurrency"),
                partition_concurrency=_keep_or_set(current.partition_concurrency, args.partition_concurrency,
                                                   "--partition-concurrency"),
                rate=current.rate if args.rate is None else (None if args.rate == "none" else parse_rate(args.rate)),
            )
        set_queue_limits(session, args.name, limits)
    _warn_if_unknown_queue(engine, args.name, set_before)
    shown = {
        "queue": args.name, "concurrency": limits.concurrency, "partition_concurrency": limits.partition_concurrency,
        # As `sa-jobs queues` shows it (and --rate takes it): "10/1s".
        "rate": None if limits.rate is None else format_rate(limits.rate),
    }
    if args.json:
        _print_json(shown)
    else:
        print(f"queue {args.name}: " + ", ".join(f"{k}={v if v is not None else 'unlimited'}"
                                                for k, v in shown.items() if k != "queue"))
    return 0


def _queue_row_exists(session, name: str) -> bool:  # type: ignore[no-untyped-def]
    """Whether an earlier setting (pause, limit) named ``name``: one primary-key read, made
    in the command's transaction before it writes that row."""
    from sqlalchemy import exists, select

    from ._validate import queue_name
    from .admin import _queues_table

    queue_name(name)  # the typed error first, before any SQL
    queues = _queues_table(session)
    return bool(session.execute(select(exists().where(queues.c.name == name))).scalar())


def _warn_if_unknown_queue(engine, name: str, set_before: bool) -> None:  # type: ignore[no-untyped-def]
    """Say so when no job and no earlier setting names ``name``: a mistyped queue is paused
    or limited without a word while the real one runs on. Not refused: a queue may be set
    up before its first job. Run after the command committed: when no job names the queue
    the look-up reads the whole jobs table (no index covers the queue of every state), and
    an urgent pause must not wait for it."""
    from sqlalchemy import exists, select
    from sqlalchemy.orm import Session

    from .model import Job

    if set_before:
        return
    with Session(engine) as session:
        if not session.execute(select(exists().where(Job.__table__.c.queue == name))).scalar():
            print(f"sa-jobs: warning: no job and no earlier setting names queue {name!r}; set anyway"
                  " (is the name right? `sa-jobs queues` lists the queues)", file=sys.stderr)


def _keep_or_set(current: Optional[int], given: Optional[str], option: str) -> Optional[int]:
    """CLI limit values: absent keeps the current one, ``none`` removes it, else an int in
    1..MAX_LIMIT (past it QueueLimits refused it in the API's words: "must be a positive
    int or None, not 99999999999")."""
    from .admin import MAX_LIMIT

    if given is None:
        return current
    if given == "none":
        return None
    number = _validate.decimal_integer(given)
    if number is None or not 1 <= number <= MAX_LIMIT:
        raise ConfigurationError(f"invalid limit {given!r} for {option}: use an integer from 1 to {MAX_LIMIT}, or none")
    return number


@contextlib.contextmanager
def _ctrl_c_between_batches(progress: Progress) -> Iterator[Callable[[int, int], None]]:
    """A progress callback under which the first Ctrl-C, once the batches have begun,
    stops the run after the batch in flight (a second one stops it at once).

    psycopg answers Ctrl-C by cancelling the running statement; a batch that committed
    before the cancel reached the server was deleted, its row count lost with its result,
    and the run said one batch fewer than it had deleted. A batch is bounded (``--batch``
    rows, SKIP LOCKED), so waiting for its end is short. Before the first batch (counting)
    Ctrl-C stops at once, as everywhere else."""
    state = {"started": False, "stop": False}

    def on_sigint(signum: int, frame: object) -> None:
        if not state["started"] or state["stop"]:
            raise KeyboardInterrupt
        state["stop"] = True

    def on_batch(done: int, total: int) -> None:
        progress(done, total)
        state["started"] = True
        if state["stop"]:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        yield progress
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield on_batch
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C raised at the end of the block, not inside it (in the main thread)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _cmd_prune(args: argparse.Namespace) -> int:
    from ._url import to_conninfo
    from .maintenance.pruner import prune
    from .states import FINISHED_STATES

    states = args.state or list(FINISHED_STATES)
    ages = {s: args.older_than for s in states}
    _require_schema(args)
    progress = Progress("pruning ", args.progress)
    verb = "would delete" if args.dry_run else "deleted"
    deleted: dict[str, int] = {}
    try:
        with _ctrl_c_between_batches(progress) as on_batch:
            result = prune(to_conninfo(_database_url(args)), args.schema, ages, batch=args.batch, progress=on_batch,
                           dry_run=args.dry_run, counts=deleted)
    except KeyboardInterrupt:
        # Each batch is its own transaction: those done stay done. Say how many, not a traceback.
        progress.close()
        # What it did, as an interrupted bulk action prints ("20 job(s) deleted"): each
        # state's lines, as a whole run says them. A dry run's counts are all or nothing
        # (it stopped while counting).
        done = {} if args.dry_run else {s: deleted.get(s, 0) for s in ages}
        if args.json:
            _print_json({"dry_run": args.dry_run, verb.replace(" ", "_"): done, "interrupted": True})
        else:
            for state, n in done.items():
                print(f"{state}: {verb} {n} job(s)")
        if args.dry_run:  # it only counts: nothing to go on with
            print("sa-jobs: dry run interrupted; nothing was deleted", file=sys.stderr)
        else:
            print(f"sa-jobs: interrupted after {progress.done} job(s) deleted; run it again to go on", file=sys.stderr)
        return 130
    except Exception as exc:
        # A batch that failed (a lost connection, a lock timeout) rolled back; those before
        # it committed: say how many, before main reports the error, as _bulk does (and
        # with --json, print what each state lost, and the error's line).
        progress.close()
        if progress.done:
            print(f"sa-jobs: stopped after {progress.done} job(s) deleted", file=sys.stderr)
        message = _error_line(exc)
        if args.json and message is not None:
            done = {} if args.dry_run else {s: deleted.get(s, 0) for s in ages}
            _print_json({"dry_run": args.dry_run, verb.replace(" ", "_"): done, "error": message})
        raise
    progress.close()
    if args.json:
        # A dry run's counts are not rows deleted: under "deleted" a script took them for so.
        _print_json({"dry_run": args.dry_run, verb.replace(" ", "_"): result})
    else:
        for state, n in result.items():
            print(f"{state}: {verb} {n} job(s)")
    return 0


def _arg_type(check):  # type: ignore[no-untyped-def]
    """An argparse type from a validator that raises SaJobsError: a clear usage error."""

    def convert(value: str):  # type: ignore[no-untyped-def]
        try:
            return check(value)
        except SaJobsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


def _job_id(value: str) -> int:
    from .admin import check_job_id

    number = _validate.decimal_integer(value)
    if number is None:
        raise argparse.ArgumentTypeError(f"invalid job id {value!r}: job ids are positive integers")
    try:
        return check_job_id(number)
    except SaJobsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_BIGINT_MAX = 2**63 - 1  # past it a LIMIT failed in the database: "bigint out of range"
_PORT_MAX = 65535


def _int_in(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high``, in ASCII digits (argparse's
    type=int took '١٠' and '1_0'). Out of range
    it is the option's error, naming it and the range (`jobs list --limit 200000` was
    refused in the Python API's words, a bulk `--limit` past a bigint by the database,
    a `--metrics-port` of -1 by getaddrinfo)."""

    def convert(value: str) -> int:
        number = _validate.decimal_integer(value)
        if number is None or number < low or (high is not None and number > high):
            allowed = f"from {low} to {high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"must be an integer{',' if high is None else ''} {allowed}, not {value!r}")
        return number

    convert.__name__ = "integer"
    return convert


def _add_operator_commands(sub, common, timeouts) -> None:  # type: ignore[no-untyped-def]
    from . import _validate
    from .admin import MAX_LIST_LIMIT, check_state, parse_age
    from .maintenance.pruner import DEFAULT_BATCH, MAX_BATCH
    from .states import FINISHED_STATES

    state_t, queue_t, kind_t, age_t = (_arg_type(check_state), _arg_type(_validate.queue_name),
                                       _arg_type(_validate.kind_name), _arg_type(parse_age))

    def output(p: argparse.ArgumentParser) -> None:
        common(p)
        timeouts(p, lock=True)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def filters(p: argparse.ArgumentParser, *, states: bool = True) -> None:
        p.add_argument("--queue", action="append", type=queue_t, metavar="NAME", help="only this queue (repeatable)")
        p.add_argument("--kind", action="append", type=kind_t, metavar="KIND", help="only this kind (repeatable)")
        if states:
            p.add_argument("--state", action="append", type=state_t, metavar="STATE", help="only this state (repeatable)")
        p.add_argument("--older-than", type=age_t, metavar="AGE", help="created longer ago than AGE (90s, 15m, 12h, 7d, 2w)")
        p.add_argument("--newer-than", type=age_t, metavar="AGE", help="created within AGE")

    def bulk(p: argparse.ArgumentParser) -> None:
        p.add_argument("--limit", type=_int_in(1, _BIGINT_MAX), metavar="N",
                       help="act on at most N matching jobs (oldest first; default all)")
        p.add_argument("--batch", type=_int_in(1, MAX_BATCH), default=_BULK, metavar="N",
                       help=f"jobs per transaction (default {_BULK})")
        p.add_argument("--progress", action="store_true", default=None, help="show a progress bar even off a terminal")

    jobs = sub.add_parser("jobs", help="list, show, retry, cancel or delete jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    ls = jsub.add_parser("list", help="jobs matching the filters, newest first")
    output(ls)
    filters(ls)
    ls.add_argument("--limit", type=_int_in(1, MAX_LIST_LIMIT), default=50, metavar="N", help=f"at most N rows, 1 to {MAX_LIST_LIMIT} (default 50)")
    ls.set_defaults(func=_cmd_jobs_list)
    show = jsub.add_parser("show", help="every column of one job")
    output(show)
    show.add_argument("id", type=_job_id, metavar="JOB_ID", help="the job's id")
    show.set_defaults(func=_cmd_jobs_show)
    for name, func, text in (
        ("retry", _cmd_jobs_retry, "make jobs available now (dead, cancelled, completed, retryable, scheduled)"),
        ("cancel", _cmd_jobs_cancel, "cancel queued or running jobs"),
        ("delete", _cmd_jobs_delete, "delete jobs that are not running"),
    ):
        p = jsub.add_parser(name, help=text)
        output(p)
        p.add_argument("ids", nargs="*", type=_job_id, metavar="JOB_ID",
                       help="jobs to act on (with filters: those of them that match)")
        filters(p)
        bulk(p)
        p.set_defaults(func=func)

    queues = sub.add_parser("queues", help="jobs per state, paused and limits, per queue; pause, resume or limit a queue")
    output(queues)
    qsub = queues.add_subparsers(dest="queue_action")
    for action in ("pause", "resume"):
        p = qsub.add_parser(action, help=f"{action} a queue for every worker")
        # SUPPRESS: options given before the action (`queues --json pause X`) must survive.
        p.add_argument("--database-url", default=argparse.SUPPRESS, metavar="URL", help=f"PostgreSQL URL (default: ${ENV_VAR})")
        p.add_argument("--schema", default=argparse.SUPPRESS, metavar="NAME", help=_SCHEMA_HELP)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
        timeouts(p, lock=True, default=argparse.SUPPRESS)
        p.add_argument("name", type=queue_t, metavar="NAME", help="the queue's name")
        p.set_defaults(func=_cmd_queue_pause)
    p = qsub.add_parser("limit", help="set a queue's cluster-wide limits (given ones change; none removes one)")
    p.add_argument("--database-url", default=argparse.SUPPRESS, metavar="URL", help=f"PostgreSQL URL (default: ${ENV_VAR})")
    p.add_argument("--schema", default=argparse.SUPPRESS, metavar="NAME", help=_SCHEMA_HELP)
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    timeouts(p, lock=True, default=argparse.SUPPRESS)
    p.add_argument("name", type=queue_t, metavar="NAME", help="the queue's name")
    p.add_argument("--concurrency", metavar="N|none", help="jobs of the queue running at once, cluster-wide")
    p.add_argument("--partition-concurrency", metavar="N|none", help="jobs running at once per partition key")
    p.add_argument("--rate", metavar="COUNT/PERIOD|none", help="jobs started per period, e.g. 10/1s, 600/m")
    p.add_argument("--clear", action="store_true", help="remove every limit of the queue")
    p.set_defaults(func=_cmd_queue_limit)
    queues.set_defaults(func=_cmd_queues)

    dead = sub.add_parser("dead", help="dead jobs in bulk")
    dsub = dead.add_subparsers(dest="dead_command", required=True)
    replay = dsub.add_parser("replay", help="replay dead jobs of a kind, in batches")
    output(replay)
    filters(replay, states=False)
    replay.add_argument("--all-kinds", action="store_true", help="replay dead jobs of every kind")
    bulk(replay)
    replay.set_defaults(func=_cmd_dead_replay, newer_than=None)

    prune = sub.add_parser("prune", help="delete finished jobs older than an age, in batches")
    output(prune)
    prune.add_argument("--older-than", type=age_t, required=True, metavar="AGE",
                       help="finished longer ago than AGE (90s, 15m, 12h, 7d, 2w)")
    prune.add_argument("--state", action="append", choices=FINISHED_STATES,
                       help="completed, cancelled or dead (repeatable; default all three)")
    prune.add_argument("--batch", type=_int_in(1, MAX_BATCH), default=DEFAULT_BATCH, metavar="N",
                       help=f"rows deleted per transaction (default {DEFAULT_BATCH})")
    prune.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    prune.add_argument("--progress", action="store_true", default=None, help="show a progress bar even off a terminal")
    prune.set_defaults(func=_cmd_prune)


def _seconds_in(most: float, *, least: float = 0.0, zero: bool = False, infinite: bool = False) -> Callable[[str], float]:
    """An argparse type, as _int_in: seconds in ASCII, finite ('inf', full-width digits and
    '1_0' were taken) unless ``infinite``, more than 0 (or from ``least``; 0 too if ``zero``),
    at most ``most``: `worker --poll-interval 1e300` was taken (the worker never polled),
    a --lease past the Worker's bound refused in the Python API's words, not the option's."""
    lowest = f"{least:g} or more seconds" if least else "0 or more seconds" if zero else "a positive number of seconds"
    rule = f"{lowest}, at most {most:g}" + (" (or inf)" if infinite else "")

    def convert(value: str) -> float:
        if infinite and value.strip().lower() in ("inf", "infinity"):
            return float("inf")
        number = _validate.decimal_number(value)
        if number is None or not (least <= number <= most and (number > 0 or zero)):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {value!r}")
        return number

    convert.__name__ = "seconds"
    return convert


def _log_level(value: str) -> str:
    """A level name logging knows: basicConfig raised ValueError, a traceback, on any other."""
    name = value.upper()
    if not isinstance(logging.getLevelName(name), int):
        raise argparse.ArgumentTypeError(
            f"unknown log level {value!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return name


# Options whose value may start with '-': argparse took `--older-than -5s` for an option
# without its value ("expected one argument"); as `--older-than=-5s` the value reaches its
# check, which says what is wrong with it, as for any other bad age. (A value such as -5 or
# -1.5 argparse already passes on: it is a negative number.)
_DASH_VALUE_OPTIONS = ("--older-than", "--newer-than", "--rate")
_DASH_VALUE = re.compile(r"-\s*\.?\d")


class _Parser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def, override]
        argv = list(sys.argv[1:] if args is None else args)
        joined: list[str] = []
        i = 0
        while i < len(argv):
            if argv[i] == "--":
                joined.extend(argv[i:])
                break
            if argv[i] in _DASH_VALUE_OPTIONS and i + 1 < len(argv) and _DASH_VALUE.match(argv[i + 1]):
                joined.append(f"{argv[i]}={argv[i + 1]}")
                i += 2
                continue
            joined.append(argv[i])
            i += 1
        return super().parse_known_args(joined, namespace)


_SCHEMA_HELP = f"Postgres schema of the queue (default {schema_mod.DEFAULT_SCHEMA})"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="sa-jobs", description="Durable background jobs on PostgreSQL.")
    parser.add_argument("--version", action="version",
                        version=f"sa-jobs {__version__} (queue schema version {schema_mod.LATEST_VERSION})")
    parser.add_argument("--log-level", default="INFO", type=_log_level, metavar="LEVEL",
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", metavar="URL", help=f"PostgreSQL URL (default: ${ENV_VAR})")
        p.add_argument("--schema", default=schema_mod.DEFAULT_SCHEMA, metavar="NAME", help=_SCHEMA_HELP)

    def timeouts(p: argparse.ArgumentParser, *, lock: bool, default: object = None) -> None:
        p.add_argument("--connect-timeout", type=_connect_timeout, metavar="SECONDS", default=default,
                       help=f"give up connecting after this long (default: ${CONNECT_TIMEOUT_ENV}, the URL's"
                            f" connect_timeout, else {DEFAULT_CONNECT_TIMEOUT}; 0: no limit; at most {MAX_CONNECT_TIMEOUT})")
        if lock:
            p.add_argument("--lock-timeout", type=_lock_timeout, metavar="SECONDS", default=default,
                           help=f"give up waiting for a row or table lock after this long (default:"
                                f" ${LOCK_TIMEOUT_ENV}, else a lock_timeout the URL's options or PGOPTIONS set, else"
                                f" {DEFAULT_LOCK_TIMEOUT:g}; 0: no limit; at most {MAX_LOCK_TIMEOUT})")

    w = sub.add_parser("worker", help="run a worker for the job kinds declared in MODULES")
    w.add_argument("modules", nargs="+", metavar="MODULE", help="modules that declare job kinds and handlers")
    common(w)
    w.add_argument("--queue", action="append", metavar="NAME[=N]",
                   help="queue to work, with its concurrency (repeatable; default: every queue of the modules'"
                        f" kinds, at --concurrency; N at most {MAX_WORKER_CONCURRENCY})")
    w.add_argument("--concurrency", type=_int_in(1, MAX_WORKER_CONCURRENCY), default=10, metavar="N",
                   help=f"jobs at once per queue (default 10, at most {MAX_WORKER_CONCURRENCY})")
    # -1 grace released every job at once, nan waited for ever; inf waits for every job.
    w.add_argument("--lease", type=_seconds_in(_DAY), default=30.0, metavar="SECONDS",
                   help=f"how long a claim holds a job without a heartbeat (default 30, at most {_DAY})")
    w.add_argument("--poll-interval", type=_seconds_in(_HOUR), default=1.0, metavar="SECONDS",
                   help=f"look for jobs this often when no insert notification comes (default 1, at most {_HOUR})")
    w.add_argument("--maintenance-interval", type=_seconds_in(_HOUR), default=1.0, metavar="SECONDS",
                   help="promote due scheduled and retryable jobs and rescue expired leases this often"
                        f" (default 1, at most {_HOUR})")
    w.add_argument("--shutdown-grace", type=_seconds_in(_DAY, zero=True, infinite=True), default=30.0,
                   metavar="SECONDS", help="time running jobs get to finish on SIGTERM, SIGINT or SIGHUP"
                                           f" (default 30, at most {_DAY}; inf: all they need)")
    w.add_argument("--statement-timeout", type=_seconds_in(_DAY, least=0.001), metavar="SECONDS",
                   help=f"bound on every worker statement (default: lease/2, 2-30 s; 0.001 or more, at most {_DAY})")
    w.add_argument("--metrics-port", type=_int_in(0, _PORT_MAX), metavar="PORT", help="serve Prometheus metrics on this port (default: none)")
    w.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="metrics bind address (default 127.0.0.1; 0.0.0.0 to expose)")
    w.set_defaults(func=_cmd_worker)

    m = sub.add_parser("migrate", help="install or upgrade the queue schema (idempotent)")
    common(m)
    timeouts(m, lock=False)  # a migration waits for the one running (its lock), however long
    # Its own option (not the operator commands' --lock-timeout, a session setting): it
    # bounds each attempt of the DDL transaction only, which is then retried.
    m.add_argument("--lock-timeout", dest="ddl_lock_timeout", type=_lock_timeout, metavar="SECONDS",
                   help="wait at most this long for a table lock in each attempt of the DDL, so a long"
                        " transaction on the jobs table does not stall the workers' claims behind it"
                        f" (default {schema_mod.DEFAULT_LOCK_TIMEOUT:g}; 0: no limit; at most {MAX_LOCK_TIMEOUT})")
    m.add_argument("--lock-retries", dest="ddl_lock_retries", type=_int_in(0), metavar="N",
                   default=schema_mod.DEFAULT_LOCK_RETRIES,
                   help=f"attempts after the first, with growing pauses (default {schema_mod.DEFAULT_LOCK_RETRIES})")
    m.add_argument("--sql", action="store_true", help="print the DDL instead of applying it")
    m.add_argument("--json", action="store_true", help="print JSON (the schema and its version) instead of a line")
    m.add_argument("--from-version", type=_int_in(0), default=0, metavar="N",
                   help="with --sql: upgrade a schema at version N (sa-jobs check shows it); 0, the default,"
                        " installs")
    m.set_defaults(func=_cmd_migrate)

    r = sub.add_parser("retry", help="make dead/cancelled/completed jobs available again")
    common(r)
    timeouts(r, lock=True)
    r.add_argument("ids", nargs="+", type=_job_id, metavar="JOB_ID", help="jobs to make available")
    r.add_argument("--json", action="store_true", help="print JSON (as jobs retry --json) instead of lines")
    r.set_defaults(func=_cmd_retry)

    c = sub.add_parser("check", help="report drift between the installed schema and the expected one")
    common(c)
    timeouts(c, lock=False)
    c.add_argument("--json", action="store_true", help="print JSON (the schema and its drift, a list) instead of lines")
    c.set_defaults(func=_cmd_check)

    _add_operator_commands(sub, common, timeouts)

    d = sub.add_parser("demo", help="enqueue in a transaction and run a worker (embedded Postgres by default)")
    d.add_argument("--database-url", metavar="URL",
                   help=f"use this server instead of an embedded one (default: ${ENV_VAR}, else an embedded one)")
    d.add_argument("--metrics-port", type=_int_in(0, _PORT_MAX), default=0, metavar="PORT",
                   help="metrics port (default 0: a free one)")
    timeouts(d, lock=False)
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import _cli_start

    try:
        # Until here, Ctrl-C (while Python imported sa_jobs) was _cli_start's to answer.
        _cli_start.end()
        return _main(argv)
    except KeyboardInterrupt:
        # Before a command runs (parsing the arguments): nothing done; one line, as ever.
        if sys.stderr is not None:
            print(_cli_start.INTERRUPTED_LINE, file=sys.stderr)
        return _cli_start.INTERRUPTED_EXIT


def _main(argv: Optional[Sequence[str]]) -> int:
    for stream in (sys.stdout, sys.stderr):
        # Job data is any text: a stream in a legacy encoding (a file redirect on Windows,
        # PYTHONIOENCODING) writes what it cannot encode as escapes, not a UnicodeEncodeError.
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    if sys.stderr is None:
        # Started with stderr closed (`2>&-`): print(..., file=None) wrote the error lines
        # to stdout, into the JSON a script reads. They go nowhere instead.
        sys.stderr = open(os.devnull, "w")
    args = build_parser().parse_args(argv)
    if sys.stdout is None:
        # Started with stdout closed (`>&-`): Python's sys.stdout is None, and the command
        # acted and then failed on it with a traceback. The worker writes no output (its log
        # is stderr's) and runs; every other command refuses before doing anything.
        if args.func is not _cmd_worker:
            print("sa-jobs: stdout is closed, nothing done (redirect it to /dev/null to discard the output)",
                  file=sys.stderr)
            return 2
        sys.stdout = open(os.devnull, "w")  # its final flush (and a handler's print) need a stream
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a reader gone is caught, not at exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except KeyboardInterrupt:
        # Ctrl-C before the worker's own handlers are in (while it imports the app's
        # modules or connects), or during an operator command: a traceback of wherever
        # Python was. A command's batches each commit or roll back whole.
        print("sa-jobs: interrupted", file=sys.stderr)
        return 128 + 2  # as a process SIGINT ends
    except Exception as exc:  # noqa: BLE001 - typed errors become one line and exit 2
        if isinstance(exc, OSError) and _output_failed(exc):
            # A full disk (`> out.json`), a quota, an I/O error: one line, not a traceback.
            # (Tested here, not in an OSError clause: SchemaLockTimeoutError is a
            # TimeoutError, an OSError, and such a clause re-raised it as a traceback.)
            print(f"sa-jobs: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
            _discard_stdout()
            return 2
        error = _error_line(exc)
        if error is None:
            raise
        print(f"sa-jobs: {error}", file=sys.stderr)
        return 2


def _error_line(exc: BaseException) -> Optional[str]:
    """The one line (without "sa-jobs: ") main prints for ``exc``, or None for an error it
    lets through as a traceback (a bug, not an operator's problem)."""
    typed = _typed_error(exc)
    return str(typed) if typed is not None else _database_error(exc)


def _reader_gone() -> int:
    """stdout's reader exited (``sa-jobs jobs list | head``): stop quietly, as a process a
    SIGPIPE ends (exit 141), where a BrokenPipeError traceback followed head's output."""
    _discard_stdout()
    return 128 + 13  # SIGPIPE's number (signal.SIGPIPE does not exist on Windows)


def _discard_stdout() -> None:
    """stdout to /dev/null once writing to it failed: Python's flush at exit would raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# Errors of a write to a file or terminal: the commands write no file but stdout (the
# database's errors are the driver's, not OSError).
_WRITE_ERRORS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EIO") if hasattr(errno, name))


def _output_failed(exc: OSError) -> bool:
    """Whether ``exc`` is stdout's write failing (a full disk, a quota, a terminal gone)."""
    return exc.errno in _WRITE_ERRORS


def _database_error(exc: BaseException) -> Optional[str]:
    """One line for a driver error (server unreachable, authentication, a failed
    statement): the operator needs the server's message, not a traceback through the
    driver. Its first line only: later ones (SQLAlchemy's) repeat the statement and
    its parameters."""
    import psycopg
    from sqlalchemy.exc import DBAPIError

    original = exc.orig if isinstance(exc, DBAPIError) else exc
    if not isinstance(original, psycopg.Error):
        # The worker's start fails inside a task group, which wraps the error in a group.
        for inner in getattr(exc, "exceptions", ()):
            found = _database_error(inner)
            if found is not None:
                return found
        return None
    state = getattr(original.diag, "sqlstate", None)
    message = (str(original).strip().splitlines() or [type(original).__name__])[0]
    if state == "55P03":  # lock_not_available: the operator commands' lock timeout
        message += f"; another transaction holds what this needs (--lock-timeout or ${LOCK_TIMEOUT_ENV} waits longer)"
    return f"database error: {message}" + (f" (SQLSTATE {state})" if state else "")


def _typed_error(exc: BaseException) -> Optional[SaJobsError]:
    """The SaJobsError in ``exc``, also when a task group wrapped it in an exception group."""
    if isinstance(exc, SaJobsError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _typed_error(inner)
        if found is not None:
            return found
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
