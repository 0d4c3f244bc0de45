"""Database URL handling: one place turns what users pass into what each driver needs."""

from __future__ import annotations

import inspect
import logging
import os
import re
import types
from typing import Any

from .errors import ConfigurationError

ENV_VAR = "SA_JOBS_DATABASE_URL"
_POSTGRES_BACKENDS = ("postgresql", "postgres")

log = logging.getLogger("sa_jobs")


def _is_postgres(url) -> bool:  # type: ignore[no-untyped-def]
    """Any PostgreSQL URL (``postgresql+asyncpg://`` in an async app's settings too): it
    only locates the database, and sa-jobs connects to it with psycopg 3 whatever the
    driver named."""
    return url.drivername.partition("+")[0] in _POSTGRES_BACKENDS


def _parse(target: object):
    from sqlalchemy.engine import URL, Engine, make_url
    from sqlalchemy.exc import ArgumentError

    if isinstance(target, Engine):
        return _refuse_nul(target.url)
    if hasattr(target, "sync_engine"):  # AsyncEngine
        return _refuse_nul(target.sync_engine.url)  # type: ignore[attr-defined]
    if isinstance(target, URL):
        return _refuse_nul(target)
    if not isinstance(target, str) or not target.strip():
        raise ConfigurationError(f"expected a PostgreSQL URL, an Engine or an AsyncEngine, got {target!r}")
    try:
        url = make_url(target.strip())
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigurationError(f"not a database URL: {redact(target.strip())!r} ({exc})") from None
    return _refuse_nul(url)


def _refuse_nul(url):  # type: ignore[no-untyped-def]
    """``url``, unless a part holds a NUL (``%00``): libpq reads each keyword only up to
    it, so ``/mydb%00staging`` connected to ``mydb``, and sa-jobs acted on another
    database's queue without a word (a password was cut short too)."""
    parts = {"user": url.username, "password": url.password, "host": url.host, "database": url.database}
    for key, value in url.query.items():
        parts[f"query {key!r}"] = ",".join(value) if isinstance(value, tuple) else value
        if "\x00" in key:
            parts["query"] = key
    bad = [name for name, value in parts.items() if value is not None and "\x00" in str(value)]
    if bad:
        raise ConfigurationError(
            f"the database URL's {', '.join(bad)} holds a NUL character (%00), which libpq would read only up to:"
            " it would reach another database, or log in as another user")
    # A byte that is not UTF-8 (a Latin-1 password typed in a shell, or in an env file, of
    # that locale) reaches Python as a lone surrogate ('\udcff'): SQLAlchemy's rendering of
    # the URL and psycopg's conninfo failed on it with a UnicodeEncodeError traceback.
    for key in url.query:
        if _not_utf8(key):
            parts["query"] = key
    bad = [name for name, value in parts.items() if value is not None and _not_utf8(str(value))]
    if bad or _not_utf8(url.drivername):
        raise ConfigurationError(
            f"the database URL's {', '.join(bad) or 'scheme'} holds bytes that are not UTF-8 (the shell's or"
            " the environment's encoding?): libpq takes UTF-8 text; write it in UTF-8")
    return url


def _not_utf8(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate: a byte that was not UTF-8, as os and sys pass it on."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
    does for a URL that failed to parse; an empty one (pgserver's ``postgres:@``) left out."""
    url = _parse(target)
    if url.password == "":
        scheme, _, rest = target.strip().partition("://")
        userinfo, _, host = rest.partition("@")  # an empty password: the userinfo ends in ":"
        return f"{scheme}://{userinfo.removesuffix(':')}@{host}"
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


def _psycopg_engine(target: object) -> Any:
    """``target``'s sync Engine if it connects with psycopg 3, else None: another driver's
    connect_args, creator and connect listeners (asyncpg's ``server_settings``, its type
    codecs) would mean nothing to psycopg, which sa-jobs' own engines use."""
    from sqlalchemy.engine import Engine

    engine = getattr(target, "sync_engine", target)
    if not isinstance(engine, Engine) or engine.dialect.driver not in ("psycopg", "psycopg_async"):
        return None
    return engine


def _default_creator_params(engine: Any) -> dict[str, Any] | None:
    """The keywords SQLAlchemy's default creator passes the driver, or None when the pool
    has a custom ``creator`` (or ``async_creator``): it keeps them only in its closure."""
    creator = getattr(engine.pool, "_creator", None)
    code = getattr(creator, "__code__", None)
    if code is None or "cparams" not in code.co_freevars or creator.__closure__ is None:  # type: ignore[union-attr]
        return None
    return creator.__closure__[code.co_freevars.index("cparams")].cell_contents  # type: ignore[union-attr,no-any-return]


def connect_args(target: object) -> dict[str, Any]:
    """The ``connect_args`` an Engine or AsyncEngine was made with (``{}`` for a URL): the
    driver keywords beyond its URL's, which an engine or connection sa-jobs makes from the
    URL alone left out (a search_path or role in ``options``, sslmode, a password).

    SQLAlchemy keeps them only in its default creator's closure; an engine with a custom
    ``creator`` has none there (its connections are the creator's business). asyncpg's
    are given in libpq's words (:func:`_libpq_of_asyncpg`); another driver's mean nothing
    to psycopg."""
    from sqlalchemy.engine import Engine

    engine = getattr(target, "sync_engine", target)
    if not isinstance(engine, Engine) or engine.dialect.driver not in ("psycopg", "psycopg_async", "asyncpg"):
        return {}
    given = _default_creator_params(engine)
    if given is None:
        return {}
    _, from_url = engine.dialect.create_connect_args(engine.url)
    # ``context`` is the dialect's own adapters map, made anew by each call.
    args = {k: v for k, v in given.items() if k != "context" and (k not in from_url or from_url[k] != v)}
    return _libpq_of_asyncpg(args) if engine.dialect.driver == "asyncpg" else args


# asyncpg.connect()'s keywords that libpq has too, by their libpq names.
_ASYNCPG_LIBPQ = {
    "host": "host", "port": "port", "user": "user", "password": "password", "passfile": "passfile",
    "database": "dbname", "service": "service", "servicefile": "servicefile",
    "target_session_attrs": "target_session_attrs", "krbsrvname": "krbsrvname", "gsslib": "gsslib",
}


def _libpq_of_asyncpg(args: dict[str, Any]) -> dict[str, Any]:
    """An asyncpg engine's connect_args as libpq keywords, for sa-jobs' psycopg connections
    to its database: dropped, an app naming its database or password there had the worker
    and drain() connect elsewhere, and its ``server_settings`` (a search_path) were lost.
    ``server_settings`` become ``options`` (``-c name=value``, libpq's escapes), ``timeout``
    ``connect_timeout``, and ``ssl`` given as a mode (or True: asyncpg's verify-full
    against the system's CAs) ``sslmode``. An SSLContext has no libpq form and is left out, with asyncpg's own
    settings (statement caches, command_timeout)."""
    import math

    out: dict[str, Any] = {}
    for key, value in args.items():
        if key in _ASYNCPG_LIBPQ and isinstance(value, (str, int)) and not isinstance(value, bool):
            out[_ASYNCPG_LIBPQ[key]] = value
        elif key == "server_settings" and isinstance(value, dict) and value:
            out["options"] = " ".join(f"-c {_options_escape(str(k))}={_options_escape(str(v))}" for k, v in value.items())
        elif key == "timeout" and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            out["connect_timeout"] = max(1, math.ceil(value))
        elif key == "ssl" and isinstance(value, str):
            out["sslmode"] = value
        elif key == "ssl" and value is True:  # asyncpg's default context: the system's CAs
            from psycopg import pq

            out["sslmode"] = "verify-full"
            if pq.version() >= 160000:  # libpq's name for them since 16
                out["sslrootcert"] = "system"
    return out


def _options_escape(text: str) -> str:
    """``text`` as one word of libpq's ``options``: spaces separate words unless escaped."""
    return text.replace("\\", "\\\\").replace(" ", "\\ ")


# Events whose stored listeners return their arguments (SQLAlchemy wraps a listener given
# without retval=True so that it does): copied as retval=True, not wrapped a second time.
_RETVAL_EVENTS = frozenset({"before_execute", "before_cursor_execute"})


def twin_engine(target: object, *, async_: bool = False, transactions: bool = False, **engine_options: Any) -> Any:
    """A new Engine (an AsyncEngine with ``async_``) on ``target``'s database that connects
    as ``target`` does, for code that cannot share its pool (another event loop, the other
    kind): with its connect_args, its isolation level, its creator, and its own event
    listeners (connect, checkout, do_connect, before_cursor_execute, ...). Made from the URL
    alone, the twin skipped them and talked to the database as someone else (no SET ROLE,
    another search_path). Execution options are the caller's to add.

    A creator serves its own kind only: a sync ``creator`` gives no asyncio connection, and
    an ``async_creator``'s none usable outside an event loop. A twin of the other kind
    raises :class:`~sa_jobs.errors.ConfigurationError` when it connects, rather than
    connect some other way; a ``do_connect`` listener serves both kinds.

    ``transactions``: the twin runs transactions (a worker's ctx.transaction()), so an
    ``AUTOCOMMIT`` level of ``target``'s is not copied (the app's own reads' setting):
    copied, every attempt failed on a connection in autocommit mode."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    url = sqlalchemy_url(target, async_=async_)
    source = _psycopg_engine(target)
    options: dict[str, Any] = {}
    given = connect_args(target)  # psycopg's, or an asyncpg engine's in libpq's words
    if given:
        options["connect_args"] = given
    if source is not None:
        level = getattr(source.dialect, "_on_connect_isolation_level", None)
        if level is not None and not (transactions and level == "AUTOCOMMIT"):
            options["isolation_level"] = level
        if _default_creator_params(source) is None:  # a creator of the app's own
            same_kind = source.dialect.is_async == async_
            options["creator"] = source.pool._creator if same_kind else _creator_of_the_other_kind(async_)
    twin = (create_async_engine if async_ else create_engine)(url, **{**options, **engine_options})
    if source is not None:
        _copy_listeners(source, getattr(twin, "sync_engine", twin))
    return twin


def _creator_of_the_other_kind(async_: bool) -> Any:
    kinds = ("a sync Engine's creator=", "an AsyncEngine") if async_ else ("an AsyncEngine's async_creator=", "an Engine")

    def refuse() -> Any:
        raise ConfigurationError(
            f"{kinds[0]} cannot make the connections of {kinds[1]} on its database, which sa-jobs needs"
            " here; set the connections up in a do_connect listener (event.listens_for(engine, 'do_connect')"
            " setting cparams), in connect_args or in the URL instead, which serve both kinds")

    return refuse


def _copy_listeners(source: Any, twin: Any) -> None:
    """Listen on ``twin`` (a sync Engine) with the listeners set on ``source``, its option
    engines' included: its own, not those of the Engine class (which reach ``twin``
    anyway) nor the ones create_engine() set up for its dialect."""
    from sqlalchemy import event

    pairs = ((source.dispatch, twin), (source.pool.dispatch, twin.pool), (source.dialect.dispatch, twin.dialect))
    try:
        found = [(target, _own_listeners(dispatch)) for dispatch, target in pairs]
    except (AttributeError, TypeError) as exc:
        # SQLAlchemy has no public way to list an engine's listeners; this reads its event
        # registry (2.0.30 to 2.1). A release that reshapes it must not stop every twin.
        log.warning("the listeners of %r could not be read (%s): an engine sa-jobs makes from it connects"
                    " without them; pass sa-jobs an engine or URL that needs none", source, exc)
        return
    for target, listeners in found:
        for name, fn in listeners:
            event.listen(target, name, _fresh_once(fn), **({"retval": True} if name in _RETVAL_EVENTS else {}))


def _fresh_once(fn: Any, depth: int = 0) -> Any:
    """``fn``, with a ``once=True`` (or ``_once_unless_exception``) listener's "fired" state
    new: SQLAlchemy stores such a listener as a wrapper (``util.only_once``, possibly under
    its retval adapter) around one shared flag. Copied as it was, the twin's first event
    used the flag up and the app's own engine never ran the listener (nor did a later
    twin); the twin runs it once for itself instead, as if it had been set on the twin."""
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not closure or depth > 3 or not getattr(fn, "__module__", "").startswith("sqlalchemy."):
        return fn
    cells = list(closure)
    if code is _only_once_code():
        names = code.co_freevars
        if "fn" not in names or "once" not in names:
            return fn
        cells[names.index("once")] = types.CellType([_cell(cells[names.index("fn")])])
    else:  # a wrapper of SQLAlchemy's (the retval adapter): its wrapped listener, renewed
        renewed = [_fresh_once(value, depth + 1) if inspect.isroutine(value := _cell(c)) else value for c in cells]
        if all(new is _cell(old) for new, old in zip(renewed, cells)):
            return fn
        cells = [c if new is _cell(c) else types.CellType(new) for new, c in zip(renewed, cells)]
    clone = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, tuple(cells))
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__qualname__ = fn.__qualname__
    clone.__dict__.update(fn.__dict__)
    return clone


_ONLY_ONCE_CODE: list[Any] = []


def _only_once_code() -> Any:
    """The code of the wrapper ``util.only_once`` returns (the same for every wrapper)."""
    if not _ONLY_ONCE_CODE:
        from sqlalchemy import util

        _ONLY_ONCE_CODE.append(util.only_once(lambda: None, False).__code__)
    return _ONLY_ONCE_CODE[0]


def _own_listeners(dispatch: Any) -> list[tuple[str, Any]]:
    """(event name, stored listener) of an instance's dispatch, in the order they run: an
    option engine's (a joined dispatch) are its parent's, then those set on it, which
    SQLAlchemy keeps in the joined dispatch's own listener objects."""
    collections: list[tuple[str, Any]] = []

    def gather(dispatch: Any) -> None:
        if hasattr(dispatch, "parent") and hasattr(dispatch, "local"):
            gather(dispatch.parent)
            gather(dispatch.local)
            collections.extend((name, getattr(dispatch, name).local) for name in dispatch.local._event_names)
        else:
            collections.extend((name, getattr(dispatch, name)) for name in dispatch._event_names)

    gather(dispatch)
    seen: set[int] = set()
    found: list[tuple[str, Any]] = []
    for name, collection in collections:
        if id(collection) in seen:
            continue
        seen.add(id(collection))
        found.extend((name, fn) for fn in getattr(collection, "listeners", ()) if not _sqlalchemys_own(fn))
    return found


def _sqlalchemys_own(fn: Any, depth: int = 0) -> bool:
    """Whether a stored listener is SQLAlchemy's own (the dialect's on_connect that
    create_engine() set up), not an app's that SQLAlchemy wrapped (``named=True``,
    ``once=True``, without ``retval=True``): a wrapper holds the app's function in its
    closure."""
    if not getattr(fn, "__module__", "").startswith("sqlalchemy."):
        return False
    inner = [f for f in map(_cell, getattr(fn, "__closure__", None) or ()) if inspect.isroutine(f)]
    return depth > 3 or all(_sqlalchemys_own(f, depth + 1) for f in inner)


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


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
