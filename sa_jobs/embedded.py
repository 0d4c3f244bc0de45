"""The zero-setup default: a real, private PostgreSQL started on demand.

Used by ``sa-jobs demo`` and the test-suite when no database URL is given. The server comes
from the ``pgserver`` wheel when it is installed (it has wheels for CPython 3.10-3.12 only),
else from a PostgreSQL installed on the machine: ``initdb`` and ``pg_ctl`` on ``PATH``, or
Debian's newest ``/usr/lib/postgresql/<version>/bin``. Either way it gets its own data
directory and listens on a Unix socket in a directory of its own, never on a TCP port.
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from .errors import ConfigurationError, EmbeddedServerError

_CLEANUP_MODES = ("stop", "delete", "none")
_PORT = 5432  # alone in its socket directory, the server never competes for a port
# sun_path holds 108 bytes on Linux (104 on the BSDs and macOS), terminating NUL included.
_MAX_SOCKET_PATH = 103
_START_TIMEOUT = 60  # seconds pg_ctl waits for the server to accept connections
# In the data directory: the cleanup mode, postmaster pid and socket directory of a server
# sa-jobs started; every process using that server holds a shared lock on it.
_USERS_FILE = "sa_jobs_users"
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
    try:
        import pgserver
    except ImportError:
        return start_local(data_dir, cleanup=cleanup)
    import warnings

    # pgserver logs every initdb/pg_ctl run at INFO, and platformdirs warns about a
    # missing XDG_RUNTIME_DIR on servers: neither is news to a sa-jobs user.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    path = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="sa_jobs_pg_"))
    path.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(path, cleanup_mode=None if cleanup == "none" else cleanup)
    return server.get_uri()


def _check_cleanup(cleanup: str) -> None:
    if cleanup not in _CLEANUP_MODES:
        # pgserver only asserts it; without asserts (python -O) an unknown mode deleted.
        raise ConfigurationError(f"cleanup must be one of {', '.join(map(repr, _CLEANUP_MODES))}, not {cleanup!r}")


def find_binaries() -> Path | None:
    """The directory holding this machine's ``initdb`` and ``pg_ctl``, or None."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)  # initdb finds `postgres` beside itself
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(debian, key=lambda p: int(p.parent.name), reverse=True)
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
            " install PostgreSQL (initdb and pg_ctl on PATH, or Debian's postgresql package),"
            " or pip install 'sa-jobs[embedded]' (pgserver, Python < 3.13),"
            " or set SA_JOBS_DATABASE_URL (SA_JOBS_TEST_DATABASE_URL for the test suite) to a server's URL"
        )
    path = (Path(data_dir) if data_dir is not None else _mkdtemp("sa_jobs_pg_")).resolve()
    with _lock:
        if path in _started:
            return _started[path]
        with _dir_locked(path):
            url = _running_url(path)
            if url is None:
                url = _start_server(bin_dir, path, cleanup, made=data_dir is None)
            else:
                _join(bin_dir, path)
        _started[path] = url
        return url


def _start_server(bin_dir: Path, path: Path, cleanup: str, *, made: bool) -> str:
    """initdb if need be, then pg_ctl start; with the directory's lock held."""
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
        before = _postmaster_pid(path)  # a live one here is not ready, and not ours to stop
        options = f"-p {_PORT} -h '' -k {shlex.quote(str(sock))}"  # pg_ctl hands -o to /bin/sh
        try:
            _run(user, bin_dir / "pg_ctl", "-D", path, "-w", "-t", str(_START_TIMEOUT), "-o", options, "start",
                 log=path / "server.log")
        except EmbeddedServerError:
            # pg_ctl gives up waiting (-t) but not the postmaster it launched: left running,
            # it would hold the data directory with nobody to stop it.
            pid = _postmaster_pid(path)
            if pid is not None and pid != before:
                _run(user, bin_dir / "pg_ctl", "-D", path, "-m", "immediate", "-w", "stop")
            raise
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
    users = path / _USERS_FILE
    if cleanup == "none":
        users.unlink(missing_ok=True)  # a later process reuses it and leaves it running
    else:
        users.write_text(f"{cleanup}\n{_postmaster_pid(path)}\n{sock}\n")
        _join(bin_dir, path)
    return url


def _join(bin_dir: Path, path: Path) -> None:
    """Become one of the server's users if a sa-jobs process started it to be stopped: hold a
    shared lock on its users file until exit, when the last holder stops it."""
    try:
        mode, pid, sock = (path / _USERS_FILE).read_text().splitlines()[:3]
    except (OSError, ValueError):
        return  # not started by sa-jobs, or with cleanup="none"
    if mode not in ("stop", "delete") or pid != str(_postmaster_pid(path)):
        return  # a file left by an earlier server in this directory
    import fcntl

    fd = os.open(path / _USERS_FILE, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    atexit.register(_leave, bin_dir, path, Path(sock), fd, mode == "delete")


def _leave(bin_dir: Path, path: Path, sock: Path, fd: int, delete: bool) -> None:
    """At interpreter exit: stop the server (fast: end sessions) and remove its directories,
    unless another process still uses it (holds the users file's lock): the last one does."""
    import fcntl

    with _dir_locked(path):  # nobody joins while we decide
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return
        try:
            _run(_run_as(), bin_dir / "pg_ctl", "-D", path, "-m", "fast", "-w", "-t", "60", "stop")
        except EmbeddedServerError:
            pass  # already stopped, by someone else
        finally:
            os.close(fd)
        (path / _USERS_FILE).unlink(missing_ok=True)
        if delete:
            shutil.rmtree(path, ignore_errors=True)
    if sock != path:
        shutil.rmtree(sock, ignore_errors=True)  # made for this server only


@contextmanager
def _dir_locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the data directory: one process at a time starts, joins or
    stops the server in it (the lock dies with its process, so a crash leaves none behind)."""
    import fcntl

    while True:
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise EmbeddedServerError(f"cannot create the embedded server's directory {path}: {exc.strerror}:"
                                      " pass a data directory you can write to") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the last user removed it ("delete") while we waited: lock the new one
    try:
        yield
    finally:
        os.close(fd)


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
    for parent in (None, "/tmp"):
        sock = _mkdtemp("sa_jobs_pg_sock_", parent).resolve()
        if _socket_fits(sock):
            return sock
        sock.rmdir()
    raise EmbeddedServerError(f"the path of the embedded server's socket is over {_MAX_SOCKET_PATH} bytes, in"
                              f" {path} and in the temporary directory: set TMPDIR to a short directory")


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
        proc = subprocess.run(args, capture_output=True, text=True, cwd="/")
    except OSError as exc:
        raise EmbeddedServerError(f"cannot run {args[0]}: {exc.strerror}") from None
    if proc.returncode != 0:
        tool = Path(argv[0]).name
        said = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        reason = said[0] if said else f"exit status {proc.returncode}"
        if log is not None and log.exists():
            # pg_ctl says "could not start server" or "did not start in time"; the log says why.
            fatal = [line.split("FATAL:", 1)[1].strip() for line in log.read_text(errors="replace").splitlines()
                     if "FATAL:" in line]
            reason = "; ".join([*said[:1], *fatal[-1:]])
        hint = ""
        if user is not None and "Permission denied" in proc.stderr:
            hint = (f": as root the server runs as {user!r}, which must reach its directory:"
                    " set TMPDIR (or pass a data directory) under one it can enter, such as /tmp")
        where = f" (log: {log})" if log is not None else ""
        raise EmbeddedServerError(f"{tool} failed: {reason}{where}{hint}")


def _postmaster_pid(path: Path) -> int | None:
    """The live process named by ``path``'s postmaster.pid, ready or not, or None."""
    try:
        pid = int((path / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _running_url(path: Path) -> str | None:
    """The URL of the server running in ``path`` (from its postmaster.pid), or None."""
    try:
        lines = (path / "postmaster.pid").read_text().splitlines()
        pid, port, sock = int(lines[0]), int(lines[3]), lines[4]
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):  # no file, a stale one, or one being written
        return None
    if len(lines) < 8 or lines[7].strip() != "ready" or not sock:
        return None
    return f"postgresql://postgres@/postgres?host={quote(sock, safe='/')}&port={port}"
