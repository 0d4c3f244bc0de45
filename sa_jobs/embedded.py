"""The zero-setup default: a real, private PostgreSQL started on demand.

Used by ``sa-jobs demo`` and the test-suite when no database URL is given. The server comes
from the ``pgserver`` wheel when it is installed (it has wheels for CPython 3.10-3.12 only),
else from a PostgreSQL installed on the machine: ``initdb`` and ``pg_ctl`` on ``PATH``, or
Debian's newest ``/usr/lib/postgresql/<version>/bin``. Either way it gets its own data
directory and listens on a Unix socket in a directory of its own, never on a TCP port.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import ConfigurationError, EmbeddedServerError

log = logging.getLogger("sa_jobs.embedded")

_CLEANUP_MODES = ("stop", "delete", "none")
_PORT = 5432  # alone in its socket directory, the server never competes for a port
# sun_path holds 108 bytes on Linux (104 on the BSDs and macOS), terminating NUL included.
_MAX_SOCKET_PATH = 103
_SHELL_SPECIAL = frozenset(" \t\n\"'\\`$&|;<>()*?[]#~!{}")  # characters /bin/sh splits or expands on
_DQUOTE_SPECIAL = frozenset("\"\\`$")  # characters /bin/sh still expands between double quotes
_START_TIMEOUT = 60  # seconds pg_ctl waits for the server to accept connections
# initdb refuses to run as root: as root the server runs as the first of these that exists.
_RUN_AS_CANDIDATES = ("postgres", "pgserver", "sa_jobs_pg")

_lock = threading.Lock()
_started: dict[Path, str] = {}  # data dir -> URL of the servers this process started


def start(data_dir: str | os.PathLike[str] | None = None, *, cleanup: str = "stop") -> str:
    """Start (or reuse) an embedded server and return its SQLAlchemy/libpq URL.

    ``cleanup`` is ``"stop"`` (stop at interpreter exit), ``"delete"`` (stop and remove the
    data directory) or ``"none"`` (leave it running).
    """
    _check_cleanup(cleanup)
    import warnings

    # platformdirs warns about a missing XDG_RUNTIME_DIR on servers when pgserver is
    # imported (so the filter goes first), and pgserver logs every initdb/pg_ctl run at
    # INFO: neither is news to a sa-jobs user.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        with _runtime_dir_for_pgserver():
            import pgserver
    except ImportError:
        return start_local(data_dir, cleanup=cleanup)
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    # pgserver puts the socket in the data directory, else in its runtime directory (under
    # TMPDIR too without XDG_RUNTIME_DIR): a directory of ours is made where its socket fits.
    # It also hands the path to /bin/sh unquoted (pg_ctl -o "-k <dir>"): a space split it.
    if data_dir is not None and _shell_splits(Path(data_dir).resolve()):
        raise EmbeddedServerError(f"pgserver cannot start a server in {str(data_dir)!r}: it passes the path to the"
                                  " shell unquoted, which splits it at a space or a shell character:"
                                  " pass a data directory without them")
    bin_dir = Path(pgserver.__file__).parent / "pginstall" / "bin"
    # As root pgserver runs its server as the user "pgserver", and first chmods every
    # directory above its install and the data directory to g+rx,o+rx, whatever they were:
    # /root itself, for a virtualenv or a TMPDIR under it. The data directory is only ever
    # put under open ones (below). Its install is where pip put it: refusing it (or passing
    # to the machine's PostgreSQL) broke the README's first command for root in a
    # virtualenv under /root, so it is said, once, with the way to avoid it.
    as_root = os.name == "posix" and os.geteuid() == 0
    closed = _closed_parent(bin_dir) if as_root else None
    if closed is not None:
        log.warning("as root, pgserver runs its server as the user 'pgserver' and makes the directories above"
                    " its install, %s among them, enterable by every user (chmod g+rx,o+rx); install sa-jobs in a"
                    " virtualenv outside private directories to avoid it", closed)
    closed = _closed_parent(Path(data_dir).resolve()) if as_root and data_dir is not None else None
    if closed is not None:
        raise EmbeddedServerError(f"as root, pgserver runs its server as the user 'pgserver', which cannot enter"
                                  f" {closed}: pgserver would open it to every user of the machine (chmod):"
                                  " pass a data directory under one every user can enter, such as /tmp,"
                                  " or run as a normal user")
    path = (Path(data_dir) if data_dir is not None
            else _socket_tmpdir("sa_jobs_pg_", avoid=_SHELL_SPECIAL, open_to_all=as_root))
    _make_dir(path)
    # pgserver's own cleanup is atexit only: a killed process left its server running. A
    # directory of our own has no other users, so the watchdog may stop it alone; it is up
    # before initdb, for a process killed while its server starts.
    watchdog = _private_watchdog(bin_dir, path, cleanup) if data_dir is None else None
    try:
        with _kept_if_foreign(path, given=data_dir is not None):
            server = _pgserver_start(pgserver, bin_dir, path, cleanup, made=data_dir is None)
    except BaseException:
        _dismiss(watchdog)  # cleaned up here
        raise
    if watchdog is not None:
        from . import _pg_watchdog

        atexit.register(_in_starter(_pg_watchdog.dismiss), watchdog)  # runs before pgserver's (registered earlier)
    return server.get_uri()


def _private_watchdog(bin_dir: Path, path: Path, cleanup: str) -> subprocess.Popen[bytes] | None:
    """A watchdog for a server in a directory this process made (POSIX; not for ``none``)."""
    if cleanup == "none" or os.name != "posix":
        return None
    from . import _pg_watchdog

    return _pg_watchdog.spawn("private", bin_dir, path.resolve(), cleanup)


def _dismiss(watchdog: subprocess.Popen[bytes] | None) -> None:
    if watchdog is not None:
        from . import _pg_watchdog

        _pg_watchdog.dismiss(watchdog)


def _pgserver_start(pgserver: Any, bin_dir: Path, path: Path, cleanup: str, *, made: bool) -> Any:
    """``pgserver.get_server``, its failures one :class:`EmbeddedServerError` line: it raises
    what went wrong inside (RuntimeError, CalledProcessError, TimeoutExpired), a traceback
    that left the directory made for it in the temp dir, and a postmaster its pg_ctl gave
    up on (10 s, under load) running there, unowned. A Ctrl-C there is cleaned up alike,
    and raised as it came."""
    posix = os.name == "posix"
    if posix:
        from . import _pg_watchdog  # POSIX only
    before = _pg_watchdog.postmaster_pid(path) if posix else None
    said = _Said()
    pg_log = logging.getLogger("pgserver")
    pg_log.addHandler(said)
    pg_log.propagate = False
    try:
        with _c_locale():
            return pgserver.get_server(path, cleanup_mode=None if cleanup == "none" else cleanup)
    except BaseException as exc:
        if posix and _pg_watchdog.postmaster_pid(path) not in (None, before):
            _pg_watchdog.pg_ctl_stop(bin_dir, path.resolve(), "immediate")
        if made:
            shutil.rmtree(path, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = said.reason()
        if isinstance(exc, (subprocess.CalledProcessError, subprocess.TimeoutExpired)) and why is not None:
            tool = Path(str(exc.cmd[0] if isinstance(exc.cmd, (list, tuple)) else exc.cmd)).name
            reason = f"{tool} failed: {why.removeprefix(f'{tool}: ')}"
        hint = ""
        if "socket path" in reason:
            hint = (f": the path of its socket is over {_MAX_SOCKET_PATH} bytes in the data directory and in"
                    " pgserver's runtime directory: set XDG_RUNTIME_DIR or TMPDIR to a short directory,"
                    " or pass a shorter data directory")
        log = path / "log"
        where = f" (log: {log})" if log.exists() and not made else ""
        raise EmbeddedServerError(f"the embedded server (pgserver) did not start in {path}: {reason}{where}{hint}") from None
    finally:
        pg_log.removeHandler(said)
        pg_log.propagate = True


@contextlib.contextmanager
def _kept_if_foreign(path: Path, *, given: bool) -> Iterator[None]:
    """A given directory that holds files but no data directory (no PG_VERSION) gets its
    owner and mode back if the start fails: as root, pgserver and start_local give the
    directory to the server's user (chown) before initdb, which then refuses a directory
    that is not empty: the caller's own directory was left writable by that user. Undone
    only while it still has no PG_VERSION (not the initdb of another process sharing it)."""
    try:
        foreign = given and os.name == "posix" and not (path / "PG_VERSION").exists() and any(path.iterdir())
        before = path.stat() if foreign else None
    except OSError:  # none yet (made for the server), or not ours to read: initdb says
        before = None
    try:
        yield
    except BaseException:
        if before is not None and not (path / "PG_VERSION").exists():
            with contextlib.suppress(OSError):
                os.chown(path, before.st_uid, before.st_gid)
                os.chmod(path, before.st_mode & 0o7777)
        raise


@contextlib.contextmanager
def _runtime_dir_for_pgserver() -> Iterator[None]:
    """pgserver fixes its lock's directory when imported, in XDG_RUNTIME_DIR: one that does
    not exist (and, in a container with no session to make it, cannot be made) failed
    every start and then pgserver's exit handler, which takes the lock too. Such a value is
    hidden while it is imported, so that platformdirs falls back as when it is unset."""
    value = os.environ.get("XDG_RUNTIME_DIR")
    hide = value is not None and "pgserver" not in sys.modules and not os.path.isdir(value)
    if hide:
        del os.environ["XDG_RUNTIME_DIR"]
    try:
        yield
    finally:
        if hide:
            os.environ["XDG_RUNTIME_DIR"] = value  # type: ignore[assignment]


@contextlib.contextmanager
def _c_locale() -> Iterator[None]:
    """LC_ALL=C for the tools pgserver runs (they inherit the environment, and it takes no
    other): its initdb took the caller's locale, and one the machine lacks (LC_ALL or LANG
    naming a locale never generated, as in many images, or passed on by ssh) failed the
    start. start_local gives initdb --locale=C; the server is alike either way."""
    before = os.environ.get("LC_ALL")
    os.environ["LC_ALL"] = "C"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LC_ALL", None)
        else:
            os.environ["LC_ALL"] = before


class _Said(logging.Handler):
    """What pgserver logs of a failed tool: its whole output, the reason among 30 lines of
    progress, an ERROR dump on stderr ahead of the caller's own error. Kept for the
    error's one line instead."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def reason(self) -> str | None:
        """The server's last FATAL line, else the last line of its log, else the first line
        the tool wrote to stderr."""
        said: list[str] = []
        log: list[str] = []
        for message in self.messages:
            # "...stderr:\n<its stderr>\n---" of a tool; "...log (<path>) below:\n<the log>" of pg_ctl start
            if "stderr:\n" in message:
                said += _lines(message.rsplit("stderr:\n", 1)[1])
            else:
                log += _lines(message.partition(" below:\n")[2])
        fatal = [line.split("FATAL:", 1)[1].strip() for line in said + log if "FATAL:" in line]
        return next(iter([*fatal[-1:], *log[-1:], *said[:1]]), None)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and line.strip() != "---"]


def _check_cleanup(cleanup: str) -> None:
    if cleanup not in _CLEANUP_MODES:
        # pgserver only asserts it; without asserts (python -O) an unknown mode deleted.
        raise ConfigurationError(f"cleanup must be one of {', '.join(map(repr, _CLEANUP_MODES))}, not {cleanup!r}")


def _version(text: str) -> tuple[int, ...] | None:
    """'15' or '9.6' as numbers (sorted as text, 9.6 came after 15), else None."""
    parts = text.split(".")
    return tuple(map(int, parts)) if all(p.isdigit() and p.isascii() for p in parts) else None


def find_binaries(*, root: Path = Path("/")) -> Path | None:
    """The directory holding this machine's ``initdb`` and ``pg_ctl``, or None: PATH's, else
    the newest of Debian's ``/usr/lib/postgresql/<version>/bin`` and Red Hat's (PGDG)
    ``/usr/pgsql-<version>/bin``, both off PATH. ``root`` is for tests."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)  # initdb finds `postgres` beside itself
    versioned = [(v, p) for p in (root / "usr/lib/postgresql").glob("*/bin") if (v := _version(p.parent.name))]
    versioned += [(v, p) for p in (root / "usr").glob("pgsql-*/bin")
                  if (v := _version(p.parent.name.removeprefix("pgsql-")))]
    candidates += [p for _, p in sorted(versioned, key=lambda vp: vp[0], reverse=True)]
    for d in candidates:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def start_local(data_dir: str | os.PathLike[str] | None = None, *, cleanup: str = "stop") -> str:
    """:func:`start` without pgserver: ``initdb`` + ``pg_ctl`` from this machine's PostgreSQL.

    Processes given the same ``data_dir`` share one server: a lock on the directory serializes
    their starts, and of those that started or joined it with ``stop``/``delete`` the last to
    exit applies the mode. A server running there that no sa-jobs process started with
    ``stop``/``delete`` is reused and left to whoever started it.
    """
    _check_cleanup(cleanup)
    bin_dir = find_binaries()
    if bin_dir is None:
        raise ConfigurationError(
            "no database URL was given, and there is no PostgreSQL to start an embedded server from:"
            " install PostgreSQL (initdb and pg_ctl on PATH, Debian's postgresql package or Red Hat's postgresqlNN-server),"
            " or pip install 'sa-jobs[embedded]' (pgserver, Python < 3.13),"
            " or set SA_JOBS_DATABASE_URL (SA_JOBS_TEST_DATABASE_URL for the test suite) to a server's URL"
        )
    # pg_ctl hands the data directory and log file to /bin/sh between double quotes, where
    # `$` and backquotes still expand: such a path is not given to it.
    if data_dir is not None and _shell_splits(Path(data_dir).resolve(), _DQUOTE_SPECIAL):
        raise EmbeddedServerError(f"pg_ctl cannot start a server in {str(data_dir)!r}: it passes the path to the"
                                  " shell, which expands a $, ` or \\ in it: pass a data directory without them")
    path = (Path(data_dir) if data_dir is not None else _socket_tmpdir("sa_jobs_pg_", avoid=_DQUOTE_SPECIAL)).resolve()
    with _lock:
        if path in _started:
            return _started[path]
        from . import _pg_watchdog  # POSIX only, as is this fallback

        _make_dir(path)
        # A directory of our own: watched from before initdb, for a process killed while its
        # server starts; once started, the server's users (and their watchdogs) see to it.
        watchdog = _private_watchdog(bin_dir, path, cleanup) if data_dir is None else None
        try:
            with _pg_watchdog.dir_locked(path):
                url = _running_url(path)
                if url is None:
                    with _kept_if_foreign(path, given=data_dir is not None):
                        url = _start_server(bin_dir, path, cleanup, made=data_dir is None)
                else:
                    _join(bin_dir, path)
        finally:
            _dismiss(watchdog)
        _started[path] = url
        return url


def _start_server(bin_dir: Path, path: Path, cleanup: str, *, made: bool) -> str:
    """initdb if need be, then pg_ctl start; with the directory's lock held."""
    from . import _pg_watchdog

    user = _run_as()
    sock = _socket_dir(path)
    try:
        if user is not None:
            import pwd  # POSIX only, as is running as another user

            for d in {path, sock}:
                shutil.chown(d, user, pwd.getpwnam(user).pw_gid)
        if not (path / "PG_VERSION").exists():
            _run(user, bin_dir / "initdb", "-D", path, "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--locale=C", "--no-sync")
        before = _pg_watchdog.postmaster_pid(path)  # a live one here is not ready, and not ours to stop
        options = f"-p {_PORT} -h '' -k {shlex.quote(str(sock))}"  # pg_ctl hands -o to /bin/sh
        try:
            _run(user, bin_dir / "pg_ctl", "-D", path, "-w", "-t", str(_START_TIMEOUT), "-o", options, "start",
                 log=path / "server.log")
        except BaseException as exc:
            # pg_ctl gives up waiting (-t, or Ctrl-C) but not the postmaster it launched (in a
            # session of its own): left running, it would hold the data directory, unowned.
            pid = _pg_watchdog.postmaster_pid(path)
            if pid is None or pid == before:
                raise
            _pg_watchdog.pg_ctl_stop(bin_dir, path, "immediate")
            if not isinstance(exc, EmbeddedServerError):
                raise
            raise EmbeddedServerError(f"PostgreSQL in {path} did not start in time ({_START_TIMEOUT} s) and was"
                                      f" stopped: its log, {path / 'server.log'}, says what it was doing") from None
        url = _running_url(path)
        if url is None:  # pragma: no cover - pg_ctl -w returned only once the server was ready
            raise EmbeddedServerError(f"PostgreSQL in {path} did not come up; see {path / 'server.log'}")
    except BaseException:
        # Nothing started (no postmaster.pid): the directories made for this server
        # would be left in the temp dir at every failed attempt.
        if not (path / "postmaster.pid").exists():
            if sock != path:
                shutil.rmtree(sock, ignore_errors=True)
            if made:
                shutil.rmtree(path, ignore_errors=True)
        raise
    users = path / _pg_watchdog.USERS_FILE
    if cleanup == "none":
        users.unlink(missing_ok=True)  # a later process reuses it and leaves it running
    else:
        users.write_text(f"{cleanup}\n{_pg_watchdog.postmaster_pid(path)}\n{sock}\n")
        _join(bin_dir, path)
    return url


def _join(bin_dir: Path, path: Path) -> None:
    """Become one of the server's users if a sa-jobs process started it to be stopped: hold a
    shared lock on its users file until exit, when the last holder stops it."""
    import fcntl

    from . import _pg_watchdog

    try:
        mode, pid = (path / _pg_watchdog.USERS_FILE).read_text().splitlines()[:2]
    except (OSError, ValueError):
        return  # not started by sa-jobs, or with cleanup="none"
    if mode not in ("stop", "delete") or pid != str(_pg_watchdog.postmaster_pid(path)):
        return  # a file left by an earlier server in this directory
    fd = os.open(path / _pg_watchdog.USERS_FILE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    watchdog = _pg_watchdog.spawn("shared", bin_dir, path, mode)
    atexit.register(_in_starter(_leave), bin_dir, path, fd, watchdog)


def _in_starter(handler: Callable[..., None]) -> Callable[..., None]:
    """``handler`` for ``atexit``, run only in the process that started the server: a child
    the app forks (a prefork server; a fork that exits through ``sys.exit``) inherits the
    exit handlers, and its exit dismissed the parent's watchdog and stopped its server."""
    starter = os.getpid()

    def at_exit(*args: Any) -> None:
        if os.getpid() == starter:
            handler(*args)

    return at_exit


def _leave(bin_dir: Path, path: Path, fd: int, watchdog: subprocess.Popen[bytes] | None) -> None:
    """At interpreter exit: stop the server (fast: end sessions) and apply the cleanup mode,
    unless another process still uses it."""
    from . import _pg_watchdog

    _pg_watchdog.dismiss(watchdog)
    _pg_watchdog.release(bin_dir, path, fd)


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbeddedServerError(f"cannot create the embedded server's directory {path}: {exc.strerror}:"
                                  " pass a data directory you can write to") from None


def _mkdtemp(prefix: str, parent: str | None = None) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        where = parent or os.environ.get("TMPDIR") or "the temporary directory"
        raise EmbeddedServerError(f"cannot create a directory for the embedded server in {where}: {exc}:"
                                  " set TMPDIR to a writable directory, or pass a data directory") from None


def _socket_fits(d: Path) -> bool:
    # The kernel counts bytes: a non-ASCII path is longer than its characters.
    return len(os.fsencode(d / f".s.PGSQL.{_PORT}")) <= _MAX_SOCKET_PATH


def _socket_dir(path: Path) -> Path:
    """``path`` if its socket's path fits in sun_path, else a new short directory."""
    if _socket_fits(path):
        return path
    return _socket_tmpdir("sa_jobs_pg_sock_", path)


def _shell_splits(path: Path, special: frozenset[str] = _SHELL_SPECIAL) -> bool:
    return any(c in special for c in str(path))


def _socket_tmpdir(prefix: str, path: Path | None = None, *, avoid: frozenset[str] = frozenset(),
                   open_to_all: bool = False) -> Path:
    """A new temporary directory in which a socket's path fits, whose path holds none of
    ``avoid`` (characters a shell would split or expand on) and, if ``open_to_all``, which
    is under directories every user may enter: in TMPDIR, else in /tmp."""
    for parent in (None, "/tmp"):
        sock = _mkdtemp(prefix, parent).resolve()
        if (_socket_fits(sock) and not _shell_splits(sock, avoid)
                and not (open_to_all and _closed_parent(sock))):
            return sock
        sock.rmdir()
    if open_to_all and _closed_parent(Path(tempfile.gettempdir()).resolve() / prefix):
        raise EmbeddedServerError("as root the embedded server runs as an unprivileged user, which cannot enter"
                                  " the temporary directory: set TMPDIR to one every user can enter, such as /tmp")
    where = f" in {path} and" if path is not None else ""
    raise EmbeddedServerError(f"the path of the embedded server's socket is over {_MAX_SOCKET_PATH} bytes,{where}"
                              " in the temporary directory: set TMPDIR to a short directory")


def _closed_parent(path: Path) -> Path | None:
    """The first existing directory above ``path`` that not every user may list and enter."""
    for parent in path.parents:
        try:
            if parent.stat().st_mode & 0o055 != 0o055:
                return parent
        except FileNotFoundError:
            continue  # made later, by us: open under the usual umask
    return None


def _run_as(candidates: Sequence[str] = _RUN_AS_CANDIDATES) -> str | None:
    """When we are root, the unprivileged user to run the server as (initdb refuses root):
    the first of ``candidates`` that exists, else the last, created."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in candidates:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", candidates[-1]], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        raise EmbeddedServerError(f"as root the embedded server runs as an unprivileged user, and there is none"
                                  f" ({', '.join(candidates)}) and `useradd {candidates[-1]}` failed: {detail}:"
                                  " create one of those users, or run as a normal user") from None
    return candidates[-1]


def _run(user: str | None, *argv: str | os.PathLike[str], log: Path | None = None) -> None:
    """Run a PostgreSQL tool (as ``user``); on failure raise, in one line, what it said."""
    args = [str(a) for a in argv]
    if log is not None:
        args[1:1] = ["-l", str(log)]
    if user is not None:
        args = ["runuser", "-u", user, "--", *args]
    try:
        # cwd="/": the tool may run as a user who cannot enter the caller's directory.
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    except OSError as exc:
        raise EmbeddedServerError(f"cannot run {args[0]}: {exc.strerror}") from None
    with proc:
        try:
            _, stderr = proc.communicate()
        except BaseException:
            # Interrupted (Ctrl-C): end the tool and wait for it. subprocess.run's SIGKILL
            # cannot be passed on by runuser, and its initdb went on, orphaned, writing the
            # directory anew after the caller's cleanup had removed it. SIGTERM is passed on,
            # and initdb removes what it wrote.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if proc.returncode != 0:
        tool = Path(argv[0]).name
        said = [line.strip() for line in stderr.splitlines() if line.strip()]
        reason = said[0] if said else f"exit status {proc.returncode}"
        if log is not None and log.exists():
            # pg_ctl says "could not start server" or "did not start in time"; the log says why.
            fatal = [line.split("FATAL:", 1)[1].strip() for line in log.read_text(errors="replace").splitlines()
                     if "FATAL:" in line]
            reason = "; ".join([*said[:1], *fatal[-1:]])
        hint = ""
        if user is not None and "Permission denied" in stderr:
            hint = (f": as root the server runs as {user!r}, which must reach its directory:"
                    " set TMPDIR (or pass a data directory) under one it can enter, such as /tmp")
        where = f" (log: {log})" if log is not None else ""
        raise EmbeddedServerError(f"{tool} failed: {reason}{where}{hint}")


def _running_url(path: Path) -> str | None:
    """The URL of the server running and ready in ``path`` (from its postmaster.pid), or None."""
    from . import _pg_watchdog

    if _pg_watchdog.serving_pid(path) is None:
        return None
    try:
        lines = (path / "postmaster.pid").read_text().splitlines()
        port, sock, status = int(lines[3]), lines[4], lines[7].strip()
    except (OSError, ValueError, IndexError):  # stopped since
        return None
    if status != "ready":
        return None
    return f"postgresql://postgres@/postgres?host={quote(sock, safe='/')}&port={port}"
