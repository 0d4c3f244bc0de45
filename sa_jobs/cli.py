"""The ``sa-jobs`` command line: worker, migrate, retry, demo."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from typing import Optional, Sequence

import anyio

from . import schema as schema_mod
from ._url import ENV_VAR, database_url_from_env
from .errors import ConfigurationError, SaJobsError


def _database_url(args: argparse.Namespace) -> str:
    url = args.database_url or database_url_from_env()
    if not url:
        raise SystemExit(f"sa-jobs: no database URL; pass --database-url or set {ENV_VAR}")
    return url


def _parse_queues(values: Optional[Sequence[str]], default: int) -> Optional[dict[str, int]]:
    if not values:
        return None
    queues: dict[str, int] = {}
    for item in values:
        name, _, limit = item.partition("=")
        try:
            queues[name] = int(limit) if limit else default
        except ValueError:
            raise SystemExit(f"sa-jobs: --queue {item!r}: the concurrency after '=' must be an integer") from None
    return queues


def _cmd_worker(args: argparse.Namespace) -> int:
    from .worker import Worker

    sys.path.insert(0, ".")
    modules = []
    for module in args.modules:
        try:
            modules.append(importlib.import_module(module))
        except ImportError as exc:
            raise SystemExit(f"sa-jobs: cannot import {module!r}: {exc}") from None
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
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
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
    return 0


def _maintenance_of(modules: Sequence[object]) -> list[object]:
    """Extra maintenance services declared by the worker's modules: ``SA_JOBS_PERIODIC``
    (Periodic declarations, fired by one PeriodicJobs service) and ``SA_JOBS_MAINTENANCE``
    (services such as ``Pruner(...)``)."""
    from .periodic import PeriodicJobs, collect

    services: list[object] = []
    periodics = collect(modules)
    if periodics:
        services.append(PeriodicJobs(periodics))
    for module in modules:
        extra = getattr(module, "SA_JOBS_MAINTENANCE", None) or ()
        for service in extra:
            if not (hasattr(service, "run_once") and hasattr(service, "name") and hasattr(service, "leader_only")):
                raise ConfigurationError(
                    f"{getattr(module, '__name__', module)}.SA_JOBS_MAINTENANCE holds {service!r},"
                    " which is not a maintenance service (name, leader_only, async run_once)"
                )
            services.append(service)
    return services


def _cmd_migrate(args: argparse.Namespace) -> int:
    if args.sql:
        sys.stdout.write(schema_mod.install_sql(args.schema))
        return 0
    version = schema_mod.install(_database_url(args), args.schema)
    print(f"sa-jobs schema {args.schema!r} is at version {version}")
    return 0


def _cmd_retry(args: argparse.Namespace) -> int:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from ._url import sqlalchemy_url
    from .admin import retry_many

    engine = create_engine(sqlalchemy_url(_database_url(args)))
    if args.schema != schema_mod.DEFAULT_SCHEMA:
        engine = engine.execution_options(schema_translate_map={schema_mod.DEFAULT_SCHEMA: args.schema})
    with Session(engine) as session, session.begin():
        done = retry_many(session, args.ids)
    missing = sorted(set(args.ids) - set(done))
    for job_id in done:
        print(f"job {job_id}: available")
    for job_id in missing:
        print(f"job {job_id}: not found in a replayable state", file=sys.stderr)
    return 1 if missing else 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .drift import check_drift

    differences = check_drift(_database_url(args), args.schema)
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

    return run_demo(args.database_url or database_url_from_env(), metrics_port=args.metrics_port)


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sa-jobs", description="Durable background jobs on PostgreSQL.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help=f"PostgreSQL URL (default: ${ENV_VAR})")
        p.add_argument("--schema", default=schema_mod.DEFAULT_SCHEMA, help="Postgres schema of the queue")

    w = sub.add_parser("worker", help="run a worker for the job kinds declared in MODULES")
    w.add_argument("modules", nargs="+", metavar="MODULE", help="modules that declare job kinds and handlers")
    common(w)
    w.add_argument("--queue", action="append", metavar="NAME[=N]", help="queue to work, with its concurrency (repeatable)")
    w.add_argument("--concurrency", type=int, default=10, help="jobs at once per queue (default 10)")
    w.add_argument("--lease", type=_positive_float, default=30.0, help="seconds a claim holds a job without a heartbeat")
    w.add_argument("--poll-interval", type=_positive_float, default=1.0)
    w.add_argument("--maintenance-interval", type=_positive_float, default=1.0)
    w.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to finish running jobs on SIGTERM")
    w.add_argument("--statement-timeout", type=_positive_float, help="bound on every worker statement (default: lease/2, 2-30 s)")
    w.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    w.add_argument("--metrics-host", default="127.0.0.1", help="metrics bind address (0.0.0.0 to expose)")
    w.set_defaults(func=_cmd_worker)

    m = sub.add_parser("migrate", help="install or upgrade the queue schema (idempotent)")
    common(m)
    m.add_argument("--sql", action="store_true", help="print the DDL instead of applying it")
    m.set_defaults(func=_cmd_migrate)

    r = sub.add_parser("retry", help="make dead/cancelled/completed jobs available again")
    common(r)
    r.add_argument("ids", nargs="+", type=int, metavar="JOB_ID")
    r.set_defaults(func=_cmd_retry)

    c = sub.add_parser("check", help="report drift between the installed schema and the expected one")
    common(c)
    c.set_defaults(func=_cmd_check)

    d = sub.add_parser("demo", help="enqueue in a transaction and run a worker (embedded Postgres by default)")
    d.add_argument("--database-url", help="use this server instead of an embedded one")
    d.add_argument("--metrics-port", type=int, default=0, help="metrics port (0 picks a free one)")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # noqa: BLE001 - typed errors become one line and exit 2
        error = _typed_error(exc)
        if error is None:
            raise
        print(f"sa-jobs: {error}", file=sys.stderr)
        return 2


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
