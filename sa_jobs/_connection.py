"""A reconnecting psycopg connection, one per worker service.

Each service owns its connection, so a slow or broken statement in one (a completion
batch, say) never blocks another (the heartbeat). A dropped connection is replaced with
capped exponential backoff; the service retries its own work.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, ContextManager, Optional

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict

log = logging.getLogger("sa_jobs.worker")

# Errors that mean "the connection or server is gone or going": reconnect and retry.
# A server that refuses writes (SQLSTATE 25006: a primary demoted to a standby in a
# failover, or default_transaction_read_only set) is one too: a new connection may reach
# the new primary (a multi-host URL, target_session_attrs=read-write), or the same server
# once it takes writes again. Taken for the data's fault, the completer dropped the
# outcomes it could not write, and their finished jobs ran again after their leases.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.ReadOnlySqlTransaction,
    OSError,
)
# ... and what a connection attempt may also raise: its own deadline.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, TimeoutError)


# TCP keepalive, on both ends of a service's connection (seconds idle, between probes, probes).
# The server's own ends a session whose client vanished without a FIN or RST (its host
# lost power, a partition): with the server's default (7200 s idle, 9 probes of 75 s) the
# backend of a cut-off leader kept the leader's advisory lock for 2 h 11 min, and no
# worker fired a periodic slot or pruned meanwhile. Set per session: any role may.
_KEEPALIVE = (10, 5, 3)
_SERVER_KEEPALIVE = ("-c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={}"
                     .format(*_KEEPALIVE))


def describe(exc: BaseException) -> str:
    """Log text for an error: its type and, for driver errors, the SQLSTATE, not the
    message (messages can echo job data, and logs must not carry args or secrets)."""
    state = getattr(getattr(exc, "diag", None), "sqlstate", None)
    return f"{type(exc).__name__}" + (f" (SQLSTATE {state})" if state else "")


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _CONNECT_ERRORS)


def is_stale_plan(exc: BaseException) -> bool:
    """A statement this connection prepared whose result columns changed under it (SQLSTATE
    0A000, "cached plan must not change result type"): a schema upgrade replaced the
    function it calls. PostgreSQL refuses it on every run on this connection; a new
    connection prepares it afresh. (psycopg's own cache is cleared by a DEALLOCATE ALL only
    the first time one runs on a connection, so a new connection is the sure way.)"""
    return isinstance(exc, psycopg.errors.FeatureNotSupported)


class ManagedConnection:
    """``timeout`` bounds every statement a service runs (see :meth:`deadline`): a socket
    that went half-open (peer gone, no RST) would otherwise block that service forever.
    The server enforces the same bound with ``statement_timeout``."""

    def __init__(
        self,
        conninfo: str,
        name: str,
        *,
        on_connect: Optional[Callable[[psycopg.AsyncConnection[Any]], Any]] = None,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        lock_timeout: Optional[float] = None,
    ) -> None:
        self._conninfo = conninfo
        # The URL's own options (a role, a search_path, -c settings) come first: passed as
        # a keyword, ours replaced them, and the worker ran without what the URL asked for.
        given = conninfo_to_dict(conninfo).get("options")
        ours = f"-c statement_timeout={int(timeout * 1000)} {_SERVER_KEEPALIVE}"
        if lock_timeout is not None:  # at least 1 ms: 0 would mean no limit
            ours += f" -c lock_timeout={max(1, int(lock_timeout * 1000))}"
        self._options = " ".join(filter(None, (str(given or "").strip(), ours)))
        self._name = name
        self._on_connect = on_connect
        self._connect_timeout = connect_timeout
        self.timeout = timeout
        self._conn: Optional[psycopg.AsyncConnection[Any]] = None
        self._failures = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def get(self) -> psycopg.AsyncConnection[Any]:
        """The live connection, (re)connecting with backoff until it succeeds."""
        while self._conn is None or self._conn.closed:
            try:
                with anyio.fail_after(self._connect_timeout + 1):
                    conn = await psycopg.AsyncConnection.connect(
                        self._conninfo,
                        autocommit=True,
                        connect_timeout=max(1, int(self._connect_timeout)),
                        application_name=f"sa_jobs:{self._name}",
                        options=self._options,
                        # TCP keepalives find a dead peer on a real network; the client
                        # deadline covers what they cannot (a proxy that still ACKs).
                        keepalives=1, keepalives_idle=_KEEPALIVE[0], keepalives_interval=_KEEPALIVE[1],
                        keepalives_count=_KEEPALIVE[2],
                    )
                if self._on_connect is not None:
                    try:
                        await self._on_connect(conn)
                    except BaseException:
                        # Not kept: closed here, not left to the garbage collector.
                        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                            await conn.close()
                        raise
                self._conn = conn
                if self._failures:
                    log.info("%s: reconnected after %d failed attempt(s)", self._name, self._failures)
                self._failures = 0
            except _CONNECT_ERRORS as exc:
                self._failures += 1
                delay = min(5.0, 0.05 * 2 ** min(self._failures, 10))
                log.warning("%s: cannot connect (%s); retrying in %.2fs", self._name, exc, delay)
                await anyio.sleep(delay)
        return self._conn

    async def heard_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the idle connection's socket to turn readable: True
        if it did. A server that ends a session (pg_terminate_backend, a shutdown, its
        idle limit) says so and closes it, and a proxy or peer that cuts it closes it,
        which a service sending nothing learnt only at its next statement. Readable says
        only that something came (a notice, a parameter change too): the caller's next
        statement finds out which. Without a connection, it waits the time out."""
        conn = self._conn
        if conn is None or conn.closed:
            await anyio.sleep(seconds)
            return False
        # anyio.wait_readable came with anyio 4.7; before, wait_socket_readable takes an fd on asyncio.
        wait: Callable[[int], Awaitable[None]] = (
            getattr(anyio, "wait_readable", None) or anyio.wait_socket_readable)  # type: ignore[assignment]
        with anyio.move_on_after(seconds):
            try:
                await wait(conn.fileno())
            except (anyio.ClosedResourceError, anyio.BusyResourceError, OSError, psycopg.Error):
                pass  # closed or broken meanwhile: the next statement says so
            return True
        return False

    def deadline(self) -> ContextManager[anyio.CancelScope]:
        """``with conn.deadline():`` around a statement: TimeoutError past ``timeout``."""
        return anyio.fail_after(self.timeout)

    async def discard(self) -> None:
        """Drop the connection after an error so the next ``get()`` opens a new one."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                try:
                    await conn.close()
                except Exception:  # noqa: BLE001 - it is already broken
                    pass

    async def close(self) -> None:
        await self.discard()
