"""Database URL handling: one place turns what users pass into what each driver needs."""

from __future__ import annotations

import os
import re
from typing import Any

from .errors import ConfigurationError

ENV_VAR = "SA_JOBS_DATABASE_URL"
_POSTGRES_BACKENDS = ("postgresql", "postgres")


def _is_postgres(url) -> bool:  # type: ignore[no-untyped-def]
    """Any PostgreSQL URL (``postgresql+asyncpg://`` in an async app's settings too): it
    only locates the database, and sa-jobs connects to it with psycopg 3 whatever the
    driver named."""
    return url.drivername.partition("+")[0] in _POSTGRES_BACKENDS


def _parse(target: object):
    from sqlalchemy.engine import URL, Engine, make_url
    from sqlalchemy.exc import ArgumentError

    if isinstance(target, Engine):
        return target.url
    if hasattr(target, "sync_engine"):  # AsyncEngine
        return target.sync_engine.url  # type: ignore[attr-defined]
    if isinstance(target, URL):
        return target
    if not isinstance(target, str) or not target.strip():
        raise ConfigurationError(f"expected a PostgreSQL URL, an Engine or an AsyncEngine, got {target!r}")
    try:
        url = make_url(target.strip())
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigurationError(f"not a database URL: {redact(target.strip())!r} ({exc})") from None
    return url


_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.I)


def redact(text: str) -> str:
    """``text`` (a URL or conninfo that failed to parse) with its password replaced by ``***``,
    for error messages: they reach terminals, CI logs and log aggregators. Everything
    between the user's ``:`` and the last ``@`` goes, so a password holding ``@``, ``/``
    or ``:`` unescaped is hidden whole (over-redacting an odd URL is the safe side)."""
    scheme, sep, rest = text.partition("://")
    if sep and "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon:
            text = f"{scheme}://{user}:***@{host}"
    # Keyword conninfo (``password=...``) and the query-string form (``?password=...``).
    return _KEYWORD_PASSWORD.sub(r"\1***", text)


def display_url(target: str) -> str:
    """``target`` (a URL) to print or log: with its password as ``***``, as :func:`redact`
    does for a URL that failed to parse."""
    url = _parse(target)
    return url.render_as_string(hide_password=True) if url.password else target


def sqlalchemy_url(target: object, *, async_: bool = False) -> str:
    """The URL for ``create_engine``/``create_async_engine`` with the psycopg 3 driver."""
    url = _parse(target)
    if not _is_postgres(url):
        raise ConfigurationError(
            f"sa-jobs needs PostgreSQL through psycopg 3; got a {url.drivername!r} URL"
            " (use postgresql:// or postgresql+psycopg://)"
        )
    url = url.set(drivername="postgresql+psycopg_async" if async_ else "postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def connect_args(target: object) -> dict[str, Any]:
    """The ``connect_args`` an Engine or AsyncEngine was made with (``{}`` for a URL): the
    driver keywords beyond its URL's, which an engine or connection sa-jobs makes from the
    URL alone left out (a search_path or role in ``options``, sslmode, a password).

    SQLAlchemy keeps them only in its default creator's closure; an engine with a custom
    ``creator`` has none there (its connections are the creator's business), and another
    driver's (asyncpg's ``server_settings``) would mean nothing to psycopg."""
    from sqlalchemy.engine import Engine

    engine = getattr(target, "sync_engine", target)
    if not isinstance(engine, Engine) or engine.dialect.driver not in ("psycopg", "psycopg_async"):
        return {}
    creator = getattr(engine.pool, "_creator", None)
    code = getattr(creator, "__code__", None)
    if code is None or "cparams" not in code.co_freevars or creator.__closure__ is None:  # type: ignore[union-attr]
        return {}
    given = creator.__closure__[code.co_freevars.index("cparams")].cell_contents  # type: ignore[union-attr]
    _, from_url = engine.dialect.create_connect_args(engine.url)
    # ``context`` is the dialect's own adapters map, made anew by each call.
    return {k: v for k, v in given.items() if k != "context" and (k not in from_url or from_url[k] != v)}


def _libpq_keywords() -> frozenset[str]:
    from psycopg import pq

    return frozenset(opt.keyword.decode() for opt in pq.Conninfo.get_defaults())


def to_conninfo(target: object) -> str:
    """A libpq connection string for raw psycopg connections (the worker's hot path).

    Keyword form (``host=... password=...``), built from the parsed URL's parts: rendering
    the URL again would leave characters SQLAlchemy does not escape (a space) raw, and
    libpq refuses such a URL, quoting its password in the error."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    url = _parse(target)
    if not _is_postgres(url):
        raise ConfigurationError(
            f"sa-jobs needs PostgreSQL; got a {url.drivername!r} URL (use postgresql://)"
        )
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
    from sqlalchemy.exc import ArgumentError

    try:
        # The psycopg dialect's own reading, so raw connections reach what the app's engine
        # does: SQLAlchemy's multi-host form ?host=h1:p1&host=h2:p2 (or one ?host=h:p) is
        # split into libpq's host=h1,h2 port=p1,p2 ("h1:p1" is no host name to libpq).
        _, opts = PGDialect_psycopg().create_connect_args(url.set(drivername="postgresql+psycopg"))
    except (ArgumentError, ValueError) as exc:  # "Can't mix 'multihost' formats together", a bad port
        raise ConfigurationError(f"{exc} (in the database URL {redact(url.render_as_string())!r})") from None
    # An engine's libpq connect_args too (not psycopg's own: autocommit, prepare_threshold).
    libpq = _libpq_keywords()
    opts.update({k: v for k, v in connect_args(target).items() if k in libpq and isinstance(v, (str, int, float))})
    # Any other repeated query key (?options=a&options=b) joins as libpq's comma-separated list.
    parts = {k: ",".join(map(str, v)) if isinstance(v, (tuple, list)) else v for k, v in opts.items()}
    try:
        return make_conninfo("", **{k: v for k, v in parts.items() if v is not None})
    except psycopg.ProgrammingError as exc:  # an option libpq does not know (asyncpg's ssl=...)
        # libpq's message ends in a newline: the refusal went out as two lines.
        raise ConfigurationError(
            f"{str(exc).strip()} in the database URL's query; sa-jobs connects with libpq, whose options apply"
            " (sslmode=require, not ssl=require)") from None


def database_url_from_env() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip()
    return value or None
