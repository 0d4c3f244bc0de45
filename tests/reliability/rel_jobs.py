"""Job kinds of the reliability suite (every kind name starts with ``rel_``).

Handlers record what they did in ``<schema>.effects`` (job_id, attempt, worker_pid, note)
so tests count executions from the database, never from the worker's word. Effects that
are not written through the job's own Session use one autocommit connection per process,
straight to the server (``REL_EFFECTS_URL``), so faults injected between the worker and
the server do not also hit the test's bookkeeping.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import anyio
import psycopg
from psycopg import sql
from sqlalchemy import text

from sa_jobs import Discard, Job, JobContext, constant_backoff
from sa_jobs._url import to_conninfo
from sa_jobs.retry import exponential_backoff

_lock = threading.Lock()
_conn: dict[str, psycopg.Connection[Any]] = {}

FAST_RETRY = constant_backoff(0.05)
# R14: small enough to run many failure sequences, wide jitter to check its bounds.
PLAN_BACKOFF = dict(base=0.02, factor=2.0, jitter=0.5, cap=0.5)


def _effects_url() -> str:
    return os.environ.get("REL_EFFECTS_URL") or os.environ["SA_JOBS_DATABASE_URL"]


def _execute(query: Any, params: Any) -> list[tuple[Any, ...]]:
    """Run a statement on the per-process connection, reconnecting on failure (bounded)."""
    deadline = time.monotonic() + 60
    while True:
        with _lock:
            try:
                conn = _conn.get("c")
                if conn is None or conn.closed:
                    conn = psycopg.connect(to_conninfo(_effects_url()), autocommit=True, connect_timeout=5)
                    _conn["c"] = conn
                cur = conn.execute(query, params)
                return cur.fetchall() if cur.description else []
            except psycopg.OperationalError:
                _conn.pop("c", None)
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.2)


def record_effect(ctx: JobContext, note: str | None = None) -> None:
    _execute(
        sql.SQL("INSERT INTO {} (job_id, attempt, worker_pid, note) VALUES (%s, %s, %s, %s)").format(
            sql.Identifier(ctx.schema, "effects")
        ),
        (ctx.id, ctx.attempt, os.getpid(), note),
    )


async def arecord_effect(ctx: JobContext, note: str | None = None) -> None:
    await anyio.to_thread.run_sync(record_effect, ctx, note)


def _insert_effect_text(schema: str) -> Any:
    return text(
        sql.SQL("INSERT INTO {} (job_id, attempt, worker_pid, note) VALUES (:j, :a, :p, :n)")
        .format(sql.Identifier(schema, "effects")).as_string()
    )


# ---- R1: at-least-once effects ----------------------------------------------------------

class RelWork(Job, kind="rel_work", queue="rel", backoff=FAST_RETRY):
    """Sleeps ``ms`` (async), then records an effect on the side: at-least-once."""


@RelWork.handler
async def rel_work(ctx: JobContext, ms: int = 0) -> None:
    if ms:
        await anyio.sleep(ms / 1000)
    await arecord_effect(ctx)


# ---- R2: effects in the job's own transaction -----------------------------------------

class RelTx(Job, kind="rel_tx", queue="rel", backoff=FAST_RETRY):
    """Writes its effect in the job's own Session, sleeps ``ms`` inside it, commits."""


@RelTx.handler
async def rel_tx(ctx: JobContext, ms: int = 0) -> None:
    async with ctx.async_transaction() as session:
        await session.execute(_insert_effect_text(ctx.schema), {"j": ctx.id, "a": ctx.attempt, "p": os.getpid(), "n": "tx"})
        if ms:
            await anyio.sleep(ms / 1000)


# ---- R3: fencing --------------------------------------------------------------------------

class RelFence(Job, kind="rel_fence", queue="rel", max_attempts=10, backoff=FAST_RETRY):
    """``mode`` tx: effect in the job's Session; plain: effect on the side then return;
    fail: raise. Sleeps ``pre`` before and ``inner`` inside the work."""


@RelFence.handler
async def rel_fence(ctx: JobContext, mode: str, pre: float, inner: float, fail_after: int = 1) -> Any:
    await anyio.sleep(pre)
    result = {"pid": os.getpid(), "attempt": ctx.attempt}
    if mode == "tx":
        async with ctx.async_transaction(result=result) as session:
            await session.execute(_insert_effect_text(ctx.schema), {"j": ctx.id, "a": ctx.attempt, "p": os.getpid(), "n": "tx"})
            await anyio.sleep(inner)
        return None
    await anyio.sleep(inner)
    if mode == "fail" and ctx.attempt <= fail_after:
        raise RuntimeError(f"rel_fence failure from pid {os.getpid()}")
    await arecord_effect(ctx, mode)
    return result


# ---- R11: completion write cut right after the handler returns ----------------------------

class RelCutCompleter(Job, kind="rel_cut_completer", queue="rel", backoff=FAST_RETRY):
    """Records an effect; with ``cut`` it then terminates its own worker's completer backend."""


def _own_ports() -> set[int]:
    import psutil

    return {c.laddr.port for c in psutil.Process().net_connections(kind="tcp") if c.laddr}


@RelCutCompleter.handler
def rel_cut_completer(ctx: JobContext, cut: bool = False) -> None:
    cut_count = 0
    if cut:  # the completer may be between connections: then there is nothing to cut
        cut_count = len(_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'sa_jobs:completer' AND client_port = ANY(%s)",
            (sorted(_own_ports()),),
        ))
    record_effect(ctx, f"cut={cut_count}")


# ---- R14: failure sequences; poison ---------------------------------------------------------

class RelPlan(Job, kind="rel_plan", queue="rel_plan", backoff=functools.partial(exponential_backoff, **PLAN_BACKOFF)):
    """Attempt ``n`` does ``plan[n-1]`` (ok | fail | discard); past the plan it fails."""


@RelPlan.handler
def rel_plan(ctx: JobContext, plan: list[str], tag: int = 0) -> dict[str, int]:
    step = plan[ctx.attempt - 1] if ctx.attempt <= len(plan) else "fail"
    if step == "discard":
        raise Discard(f"discarded at attempt {ctx.attempt}")
    if step != "ok":
        raise ValueError(f"planned failure at attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


class RelPoison(Job, kind="rel_poison", queue="rel", max_attempts=3):
    """Kills the worker process that runs it."""


@RelPoison.handler
def rel_poison(ctx: JobContext) -> None:
    record_effect(ctx, "poison")
    os._exit(17)


# ---- R6: long jobs, lost leases ------------------------------------------------------------

class RelLong(Job, kind="rel_long", queue="rel", max_attempts=5, backoff=FAST_RETRY):
    """Runs ``seconds`` (async sleep, or a CPU-bound loop in a thread) and records whether
    it was told its lease was lost. Attempts after the first run ``later`` seconds."""


@RelLong.handler
async def rel_long(ctx: JobContext, seconds: float, cpu: bool = False, later: float | None = None) -> None:
    started = time.monotonic()
    if ctx.attempt > 1 and later is not None:
        seconds = later
    try:
        if cpu:
            await anyio.to_thread.run_sync(_burn, ctx, seconds, abandon_on_cancel=True)
        else:
            await anyio.sleep(seconds)
    finally:
        with anyio.CancelScope(shield=True):
            await arecord_effect(ctx, _long_note(ctx, started))


def _long_note(ctx: JobContext, started: float) -> str:
    return f"lease_lost={ctx.lease_lost} cancelled={ctx.cancelled} ran={time.monotonic() - started:.2f}"


def _burn(ctx: JobContext, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    x = 0
    while time.monotonic() < deadline:
        for i in range(20_000):  # pure Python: holds the GIL in slices
            x ^= i * i
        if ctx.cancelled:
            break
    return x


class RelLongSync(Job, kind="rel_long_sync", queue="rel", max_attempts=5, backoff=FAST_RETRY):
    """A plain (sync) CPU-bound handler: burns ``seconds`` in pure Python, checking
    ``ctx.cancelled`` between slices, and records what it was told when it stops."""


@RelLongSync.handler
def rel_long_sync(ctx: JobContext, seconds: float, later: float | None = None) -> None:
    started = time.monotonic()
    if ctx.attempt > 1 and later is not None:
        seconds = later
    _burn(ctx, seconds)
    record_effect(ctx, _long_note(ctx, started))


class RelNoop(Job, kind="rel_noop", queue="rel", backoff=FAST_RETRY):
    """Does nothing (steady load without side writes: R16, S3, S4)."""


@RelNoop.handler
async def rel_noop(ctx: JobContext, ms: int = 0) -> None:
    if ms:
        await anyio.sleep(ms / 1000)


# ---- S2 / S4 -------------------------------------------------------------------------------

class RelEcho(Job, kind="rel_echo", queue="rel", max_attempts=1):
    """Reports the Python types its args arrived as."""


@RelEcho.handler
def rel_echo(ctx: JobContext, **args: Any) -> dict[str, str]:
    return {k: type(v).__name__ for k, v in args.items()}


class RelSecret(Job, kind="rel_secret", queue="rel", max_attempts=2, backoff=FAST_RETRY):
    """Fails with its secret argument in the exception text."""


@RelSecret.handler
async def rel_secret(ctx: JobContext, token: str, ok: bool = False, wait: float = 0) -> None:
    if wait:
        await anyio.sleep(wait)
    if ok:
        return None
    raise PermissionError(f"upstream rejected credentials {token}")


# ---- R15: jobs enqueued with business rows -------------------------------------------------

class RelBiz(Job, kind="rel_biz", queue="rel", backoff=FAST_RETRY):
    """Checks that its business row is visible (committed with it), records the answer."""


@RelBiz.handler
def rel_biz(ctx: JobContext, business_id: int) -> None:
    rows = _execute(
        sql.SQL("SELECT count(*) FROM {} WHERE id = %s").format(sql.Identifier(ctx.schema, "business")),
        (business_id,),
    )
    record_effect(ctx, "ok" if rows[0][0] == 1 else "missing")
