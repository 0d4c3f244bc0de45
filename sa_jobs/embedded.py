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
from pathlib import Path
from urllib.parse import quote

from .errors import ConfigurationError

_CLEANUP_MODES = ("stop", "delete", "none")
_PORT = 5432  # alone in its socket directory, the server never competes for a port
# sun_path holds 108 bytes on Linux (104 on the BSDs and macOS), terminating NUL included.
_MAX_SOCKET_PATH = 103
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

    A server already running in ``data_dir`` is reused, and left to whoever started it.
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
    path = (Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="sa_jobs_pg_"))).resolve()
    with _lock:
        if path in _started:
            return _started[path]
        url = _running_url(path)
        if url is not None:
            return url
        path.mkdir(parents=True, exist_ok=True)
        user = _run_as()
        sock = path
        if len(str(path / f".s.PGSQL.{_PORT}")) > _MAX_SOCKET_PATH:
            sock = Path(tempfile.mkdtemp(prefix="sa_jobs_pg_sock_"))
        try:
            if user is not None:
                import pwd  # POSIX only, as is running as another user

                for d in {path, sock}:
                    shutil.chown(d, user, pwd.getpwnam(user).pw_gid)
            if not (path / "PG_VERSION").exists():
                _run(user, bin_dir / "initdb", "-D", path, "-U", "postgres", "--auth=trust",
                     "-E", "UTF8", "--locale=C", "--no-sync")
            options = f"-p {_PORT} -h '' -k {shlex.quote(str(sock))}"  # pg_ctl hands -o to /bin/sh
            _run(user, bin_dir / "pg_ctl", "-D", path, "-w", "-t", "60", "-o", options, "start",
                 log=path / "server.log")
            url = _running_url(path)
            if url is None:  # pragma: no cover - pg_ctl -w returned only once the server was ready
                raise RuntimeError(f"PostgreSQL in {path} did not come up; see {path / 'server.log'}")
        except BaseException:
            # Nothing started (no postmaster.pid): the directories made for this server
            # would be left in the temp dir at every failed attempt.
            if not (path / "postmaster.pid").exists():
                if sock != path:
                    shutil.rmtree(sock, ignore_errors=True)
                if data_dir is None:
                    shutil.rmtree(path, ignore_errors=True)
            raise
        _started[path] = url
        if cleanup != "none":
            atexit.register(_stop, bin_dir, path, sock, user, cleanup == "delete")
        return url


def _run_as() -> str | None:
    """The unprivileged user to run the server as when we are root (created if need be)."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in _RUN_AS_CANDIDATES:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", _RUN_AS_CANDIDATES[-1]], check=True,
                   capture_output=True)
    return _RUN_AS_CANDIDATES[-1]


def _run(user: str | None, *argv: str | os.PathLike[str], log: Path | None = None) -> None:
    """Run a PostgreSQL tool (as ``user``); on failure raise with its output and the log's tail."""
    args = [str(a) for a in argv]
    if log is not None:
        args[1:1] = ["-l", str(log)]
    if user is not None:
        args = ["runuser", "-u", user, "--", *args]
    # cwd="/": the tool may run as a user who cannot enter the caller's directory.
    proc = subprocess.run(args, capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
        raise RuntimeError(f"{shlex.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}\n{tail}".rstrip())


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


def _stop(bin_dir: Path, path: Path, sock: Path, user: str | None, delete: bool) -> None:
    """At interpreter exit: stop the server (fast: end sessions), and remove its directories."""
    try:
        _run(user, bin_dir / "pg_ctl", "-D", path, "-m", "fast", "-w", "-t", "60", "stop")
    except RuntimeError:
        pass  # already stopped, by someone else
    if delete:
        shutil.rmtree(path, ignore_errors=True)
    if sock != path:
        shutil.rmtree(sock, ignore_errors=True)  # made for this run only
