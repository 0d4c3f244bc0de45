"""sa_jobs.embedded: the zero-setup server, from pgserver or from the machine's PostgreSQL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote

import psycopg
import pytest

from sa_jobs import ConfigurationError, EmbeddedServerError, _pg_watchdog, embedded

from .conftest import REPO_ROOT


def test_an_unknown_cleanup_mode_is_refused_before_anything_starts(tmp_path):
    """pgserver only asserts the mode: an AssertionError (and under ``python -O``, where
    asserts vanish, any unknown mode removed the data directory at exit, as "delete")."""
    data = tmp_path / "pg"
    with pytest.raises(ConfigurationError, match="cleanup"):
        embedded.start(data, cleanup="keep")
    assert not data.exists()


# ---- without pgserver: a PostgreSQL installed on the machine -------------------------------
# pgserver has wheels for CPython 3.10-3.12 only; on 3.13+ (or without the extra) the demo and
# the test-suite start the machine's initdb/pg_ctl instead. Each case runs in a child process,
# because the cleanup modes act at interpreter exit.

_CHILD = """
import sys
sys.modules["pgserver"] = None  # as on Python 3.13+: `import pgserver` raises ImportError
import psycopg
from sqlalchemy import create_engine, text
from sa_jobs import embedded
from sa_jobs._url import sqlalchemy_url

url = embedded.start(sys.argv[1], cleanup=sys.argv[2])
assert embedded.start(sys.argv[1], cleanup=sys.argv[2]) == url  # reused, not started twice
with psycopg.connect(url) as conn:
    print("listen_addresses=%r" % conn.execute("SHOW listen_addresses").fetchone()[0])
with create_engine(sqlalchemy_url(url)).connect() as conn:
    print("answer=%s" % conn.execute(text("SELECT 41 + 1")).scalar_one())
print("url=" + url)
"""

needs_binaries = pytest.mark.skipif(embedded.find_binaries() is None, reason="no PostgreSQL binaries on this machine")


def _run_child(data: Path, cleanup: str, *, socket_in_data: bool = True, tmpdir: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("SA_JOBS_DATABASE_URL", "SA_JOBS_TEST_DATABASE_URL")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(data), cleanup], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "answer=42" in proc.stdout
    assert "listen_addresses=''" in proc.stdout  # a Unix socket only, no TCP port
    url = proc.stdout.split("url=", 1)[1].strip()
    assert (f"host={data}&" in url) is socket_in_data  # the socket lives in the server's own directory
    return url


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under tmp_path (0700): as root the server runs as an unprivileged user.
    parent = Path(tempfile.mkdtemp(prefix="sa_jobs_test_embedded_"))
    parent.chmod(0o755)
    yield parent / "pg"
    bin_dir = embedded.find_binaries()
    if bin_dir is not None and (parent / "pg" / "postmaster.pid").exists():  # a failed "none" case
        try:
            embedded._run(embedded._run_as(), bin_dir / "pg_ctl", "-D", parent / "pg", "-m", "immediate", "stop")
        except RuntimeError:
            pass
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="module")
def rested_data_dir() -> Iterator[tuple[Path, str]]:
    """A data directory the machine's PostgreSQL served and stopped (initdb, start, stop, by
    ``cleanup="stop"``) and its server's URL, made once: the tests that need a data directory
    at rest get a copy of it (see _rested_copy)."""
    if embedded.find_binaries() is None:
        pytest.skip("no PostgreSQL binaries on this machine")
    parent = Path(tempfile.mkdtemp(prefix="sa_jobs_test_embedded_"))
    parent.chmod(0o755)  # as in data_dir: the server's user must reach it
    data = parent / "pg"
    try:
        yield data, _run_child(data, "stop")
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _rested_copy(rested: Path, data_dir: Path) -> None:
    """``data_dir`` as a copy of the rested one, with its owner (as root: the server's user)."""
    shutil.copytree(rested, data_dir, symlinks=True)
    owner = rested.stat()
    for root, dirs, files in os.walk(data_dir):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, owner.st_uid, owner.st_gid, follow_symlinks=False)


@needs_binaries
def test_without_pgserver_the_machines_postgres_serves_and_stop_keeps_the_data(rested_data_dir):
    data, url = rested_data_dir  # _run_child(data, "stop") checked that it served
    assert not _reachable(url)
    assert (data / "PG_VERSION").exists() and not (data / "postmaster.pid").exists()


@needs_binaries
def test_without_pgserver_delete_removes_the_data_directory(data_dir):
    url = _run_child(data_dir, "delete")
    assert not _reachable(url)
    assert not data_dir.exists()


@needs_binaries
def test_without_pgserver_none_leaves_the_server_running(data_dir):
    url = _run_child(data_dir, "none")
    assert _reachable(url)
    bin_dir = embedded.find_binaries()
    assert bin_dir is not None
    embedded._run(embedded._run_as(), bin_dir / "pg_ctl", "-D", data_dir, "-m", "fast", "-w", "stop")
    assert not _reachable(url)


@needs_binaries
def test_without_pgserver_a_data_dir_too_long_for_a_socket_gets_a_socket_dir_of_its_own(data_dir):
    data = data_dir.parent / ("d" * 60) / ("e" * 60)  # beyond sun_path's 108 bytes
    url = _run_child(data, "delete", socket_in_data=False)
    sock = Path(unquote(url.split("host=", 1)[1].split("&", 1)[0]))
    assert sock.name.startswith("sa_jobs_pg_sock_")
    assert not _reachable(url)
    assert not data.exists() and not sock.exists()


def test_find_binaries_looks_in_red_hats_pgsql_directories_newest_first(tmp_path, monkeypatch):
    """Red Hat's PGDG packages install to /usr/pgsql-<version>/bin, off PATH: only Debian's
    /usr/lib/postgresql/<version>/bin was looked in, so the embedded server could not start
    there. Newest first by number (16 before 9.6), across both layouts; a directory without
    both programs is passed over."""
    monkeypatch.setattr(embedded.shutil, "which", lambda name, *a, **k: None)
    for rel, programs in (("usr/pgsql-9.6/bin", ("initdb", "pg_ctl")), ("usr/pgsql-15/bin", ("initdb", "pg_ctl")),
                          ("usr/pgsql-17/bin", ("initdb",)), ("usr/pgsql-x/bin", ("initdb", "pg_ctl")),
                          ("usr/lib/postgresql/14/bin", ("initdb", "pg_ctl"))):
        (tmp_path / rel).mkdir(parents=True)
        for program in programs:
            (tmp_path / rel / program).touch()
    assert embedded.find_binaries(root=tmp_path) == tmp_path / "usr/pgsql-15/bin"
    shutil.rmtree(tmp_path / "usr/pgsql-15")
    assert embedded.find_binaries(root=tmp_path) == tmp_path / "usr/lib/postgresql/14/bin"
    shutil.rmtree(tmp_path / "usr/lib/postgresql")
    assert embedded.find_binaries(root=tmp_path) == tmp_path / "usr/pgsql-9.6/bin"
    shutil.rmtree(tmp_path / "usr/pgsql-9.6")
    assert embedded.find_binaries(root=tmp_path) is None


def test_without_pgserver_or_postgres_the_error_names_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "find_binaries", lambda: None)
    data = tmp_path / "pg"
    with pytest.raises(ConfigurationError) as info:
        embedded.start_local(data)
    message = str(info.value)
    assert "install PostgreSQL" in message and "SA_JOBS_DATABASE_URL" in message
    assert "SA_JOBS_TEST_DATABASE_URL" in message
    assert not data.exists()


@needs_binaries
@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root: the server's user cannot reach a root-only directory")
def test_a_failed_start_leaves_no_socket_directory_behind(tmp_path, monkeypatch):
    """A data directory too long for a socket gets a temporary socket directory; when the
    server then fails to start (here: initdb, as the server's user, cannot enter the
    caller's 0700 directory), that directory was left in the temp dir at every attempt."""
    temp = Path(tempfile.mkdtemp(prefix="sa_jobs_test_tmp_"))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(temp))
        tmp_path.chmod(0o700)
        data = tmp_path / ("d" * 60) / ("e" * 60)
        with pytest.raises(RuntimeError, match="initdb"):
            embedded.start_local(data, cleanup="delete")
        assert list(temp.iterdir()) == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _slow_to_start(rested: tuple[Path, str], data_dir: Path) -> None:
    """A data directory whose server stays "starting" for 10 s and more, its postmaster.pid
    written: archive recovery whose every restore_command takes 10 s."""
    _rested_copy(rested[0], data_dir)  # initdb, start, stop
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write("restore_command = 'sleep 10; false'\n")
    (data_dir / "recovery.signal").touch()


@needs_binaries
def test_a_start_that_times_out_stops_the_server_it_left_starting(rested_data_dir, data_dir, monkeypatch):
    """pg_ctl gave up waiting (-t) but the postmaster it launched went on: the caller got an
    error while a server it knew nothing of ran on, holding the data directory."""
    _slow_to_start(rested_data_dir, data_dir)
    monkeypatch.setattr(embedded, "_START_TIMEOUT", 1)
    with pytest.raises(RuntimeError, match="did not start in time") as info:
        embedded.start_local(data_dir, cleanup="stop")
    assert not (data_dir / "postmaster.pid").exists()  # stopped, not orphaned
    assert "\n" not in str(info.value)  # one line, for the CLI to print


@needs_binaries
def test_a_socket_path_is_measured_in_bytes(data_dir):
    """sun_path's limit is 107 bytes: 50 "é" are 50 characters but 100 bytes. The check counted
    characters, so the socket went into the data directory and the server could not start."""
    data = data_dir.parent / ("é" * 50) / "pg"
    assert len(str(data / ".s.PGSQL.5432")) <= embedded._MAX_SOCKET_PATH < len(os.fsencode(data / ".s.PGSQL.5432"))
    url = _run_child(data, "delete", socket_in_data=False)
    assert not _reachable(url)
    assert not data.exists()


_SHARER = """
import sys
sys.modules["pgserver"] = None
import psycopg
from sa_jobs import embedded

print("imported", flush=True)
sys.stdin.readline()  # "go": both processes start at once
try:
    url = embedded.start(sys.argv[1], cleanup="stop")
except Exception as exc:
    print("error=%s" % exc, flush=True)
    raise SystemExit(1)
print("url=" + url, flush=True)
if sys.stdin.readline().strip() == "query":  # EOF: exit now
    with psycopg.connect(url, connect_timeout=5) as conn:
        print("answer=%s" % conn.execute("SELECT 41 + 1").fetchone()[0], flush=True)
"""


@needs_binaries
def test_two_processes_starting_one_data_dir_share_one_server_until_the_last_exits(data_dir):
    """Two processes given the same data directory at once both ran initdb (one failed: "directory
    exists but is not empty"); and one that reused the other's server lost it when that one exited."""
    env = {k: v for k, v in os.environ.items() if k not in ("SA_JOBS_DATABASE_URL", "SA_JOBS_TEST_DATABASE_URL")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", _SHARER, str(data_dir)], cwd=REPO_ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "imported"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        urls = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
        assert all(u.startswith("url=") for u in urls), urls
        assert urls[0] == urls[1]
        first, second = procs
        first.communicate(timeout=60)  # EOF: it exits, its atexit runs
        assert first.returncode == 0
        out, _ = second.communicate("query\n", timeout=60)
        assert "answer=42" in out, out  # the server outlived the process that exited first
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not _reachable(urls[0][len("url="):])  # the last one out stopped it
    assert (data_dir / "PG_VERSION").exists() and not (data_dir / "postmaster.pid").exists()


@needs_binaries
@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="needs root: the server's user cannot reach a root-only directory")
def test_the_demo_says_in_one_line_why_the_embedded_server_could_not_start():
    """A TMPDIR the server's user cannot enter (as root, a private one): the demo ended in a
    traceback through subprocess, naming neither the cause nor the way out. The TMPDIR is
    short: under a long one (pytest's, in a worker process of xdist) the socket's path does
    not fit and the server is made in /tmp instead, which it can enter (CI, once)."""
    import shutil
    import tempfile

    private = Path(tempfile.mkdtemp(prefix="sajp_", dir="/tmp"))  # mode 0700
    env = {k: v for k, v in os.environ.items() if k not in ("SA_JOBS_DATABASE_URL", "SA_JOBS_TEST_DATABASE_URL")}
    env.update(PYTHONPATH=str(REPO_ROOT), TMPDIR=str(private))
    code = "import sys; sys.modules['pgserver'] = None; from sa_jobs.cli import main; sys.exit(main(['demo']))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("sa-jobs: initdb failed") and "Permission denied" in line and "TMPDIR" in line


def _script_env(server: str) -> dict[str, str]:
    """The environment of a script starting an embedded server of kind ``server`` ("local":
    the machine's PostgreSQL, "pgserver": the wheel's), or a skip if it has none."""
    if server == "local" and embedded.find_binaries() is None:
        pytest.skip("no PostgreSQL binaries on this machine")
    if server == "pgserver":
        pytest.importorskip("pgserver")
    env = {k: v for k, v in os.environ.items() if k not in ("SA_JOBS_DATABASE_URL", "SA_JOBS_TEST_DATABASE_URL")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


_KILLED = """
import sys, time
if sys.argv[1] == "local":
    sys.modules["pgserver"] = None
from sa_jobs import embedded

print("url=" + embedded.start(cleanup="delete"), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("server, signal_name", [("local", "SIGKILL"), ("local", "SIGTERM"), ("pgserver", "SIGTERM")])
def test_a_server_whose_process_was_killed_is_stopped_and_removed(server, signal_name):
    """``kill`` (SIGTERM, Python's default: no atexit) or ``kill -9`` of the demo left its
    server running, and its data directory in the temp dir, for good."""
    env = _script_env(server)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, server], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("url="), line
        url = line[len("url="):]
        data = Path(unquote(url.split("host=", 1)[1].split("&", 1)[0]))
        assert _reachable(url) and data.is_dir()
    finally:
        proc.send_signal(getattr(signal, signal_name))
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while data.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not data.exists() and not _reachable(url)
    finally:
        _stop_orphan(data)


def _stop_orphan(data: Path) -> None:
    """Stop a server a failed test left running (as the owner of its directory) and remove it."""
    pid = _pg_watchdog.postmaster_pid(data)
    if pid is not None:
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown
    shutil.rmtree(data, ignore_errors=True)


@needs_binaries
def test_a_temp_dir_too_long_for_a_socket_falls_back_to_tmp(data_dir):
    """The socket directory made for a long data directory was made in TMPDIR, whatever its
    length: with a long TMPDIR the server could not create its socket and did not start."""
    long_tmp = data_dir.parent / ("t" * 100)
    long_tmp.mkdir()
    data = data_dir.parent / ("d" * 60) / ("e" * 60)
    url = _run_child(data, "delete", socket_in_data=False, tmpdir=long_tmp)
    sock = Path(unquote(url.split("host=", 1)[1].split("&", 1)[0]))
    assert sock.parent == Path("/tmp") and sock.name.startswith("sa_jobs_pg_sock_")
    assert not data.exists() and not sock.exists()


@pytest.mark.parametrize("local", [True, False])
def test_an_unusable_temp_dir_is_one_line_naming_tmpdir(local, monkeypatch):
    """mkdtemp's FileNotFoundError came out as a traceback through tempfile."""
    if local and embedded.find_binaries() is None:
        pytest.skip("no PostgreSQL binaries on this machine")
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/sa_jobs_test_tmp")
    with pytest.raises(EmbeddedServerError, match="set TMPDIR to a writable directory") as info:
        (embedded.start_local if local else embedded.start)(cleanup="delete")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="as root only: the server's user is looked for")
def test_as_root_without_a_server_user_or_useradd_the_error_says_what_to_do(monkeypatch):
    """A machine with none of the users and no useradd (Alpine has adduser): a FileNotFoundError
    traceback from subprocess."""
    monkeypatch.setenv("PATH", "/nonexistent")  # no useradd to run
    with pytest.raises(EmbeddedServerError, match="useradd sa_jobs_test_absent_b") as info:
        embedded._run_as(("sa_jobs_test_absent_a", "sa_jobs_test_absent_b"))
    assert "create one of those users, or run as a normal user" in str(info.value)


@needs_binaries
def test_a_stale_postmaster_pid_naming_a_live_process_is_not_taken_for_a_server(rested_data_dir, data_dir):
    """After a crash and a reboot, postmaster.pid names a pid some other process now has (here
    pid 1, which always exists): the check was only that the pid lived, so start_local
    returned the URL of a server that was not there ("Connection refused")."""
    _rested_copy(rested_data_dir[0], data_dir)  # initdb, start, stop: a data directory at rest
    stale = (data_dir / "postmaster.pid")
    lines = ["1", str(data_dir), "1700000000", "5432", str(data_dir), "", "  5432001  0", "ready   "]
    stale.write_text("\n".join(lines) + "\n")
    url = _run_child(data_dir, "stop")  # asserts the server answered
    assert not _reachable(url)


@needs_binaries
def test_a_start_interrupted_by_ctrl_c_stops_the_server_it_left_starting(rested_data_dir, data_dir):
    """Ctrl-C while pg_ctl waited: the postmaster (in a session of its own) went on, with no
    atexit registered yet to stop it."""
    _slow_to_start(rested_data_dir, data_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("SA_JOBS_DATABASE_URL", "SA_JOBS_TEST_DATABASE_URL")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    code = "import sys; from sa_jobs import embedded; embedded.start_local(sys.argv[1], cleanup='stop')"
    proc = subprocess.Popen([sys.executable, "-c", code, str(data_dir)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while _pg_watchdog.postmaster_pid(data_dir) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pg_watchdog.postmaster_pid(data_dir) is not None  # starting: in recovery for 10 s
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "KeyboardInterrupt" in err
    assert _pg_watchdog.postmaster_pid(data_dir) is None  # stopped, not orphaned


_FORKS = """
import os, sys
if sys.argv[1] == "local":
    sys.modules["pgserver"] = None
import psycopg
from sa_jobs import embedded

url = embedded.start(cleanup="delete")
print("url=" + url, flush=True)
child = os.fork()
if child == 0:
    sys.exit(0)  # a forked child's normal exit: atexit handlers run, in the child
os.waitpid(child, 0)
with psycopg.connect(url, connect_timeout=5) as conn:
    print("after the child:", conn.execute("SELECT 1").fetchone()[0], flush=True)
os.kill(os.getpid(), 9)  # and the watchdog is still armed: it stops the server
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("server", ["local", "pgserver"])
def test_a_forked_childs_normal_exit_leaves_the_parents_server_running(server):
    """Found by review14: the exit handlers were not told which process started the server.
    A child forked by the app (a prefork server, a fork that exits through sys.exit) ran them
    at its own exit: it dismissed the parent's watchdog (so a later kill of the parent left
    its server running) and stopped the server of the machine's PostgreSQL under it."""
    env = _script_env(server)
    proc = subprocess.run([sys.executable, "-c", _FORKS, server], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=120)
    url = next((line[len("url="):] for line in proc.stdout.splitlines() if line.startswith("url=")), None)
    assert url is not None, proc.stdout + proc.stderr
    data = Path(unquote(url.split("host=", 1)[1].split("&", 1)[0]))
    try:
        assert "after the child: 1" in proc.stdout, proc.stdout + proc.stderr
        assert proc.returncode == -9, proc.stderr
        deadline = time.monotonic() + 30  # the child did not dismiss the parent's watchdog
        while data.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not data.exists()
    finally:
        _stop_orphan(data)


_PGSERVER_CHILD = """
import sys
import psycopg
from sa_jobs import EmbeddedServerError, embedded

try:
    url = embedded.start(sys.argv[1] if len(sys.argv) > 1 else None, cleanup="delete")
except EmbeddedServerError as exc:
    print("error=%s" % exc, flush=True)
    raise SystemExit(3)
with psycopg.connect(url, connect_timeout=10) as conn:
    print("answer=%s" % conn.execute("SELECT 41 + 1").fetchone()[0], flush=True)
print("url=" + url, flush=True)
"""


def _pgserver_child(tmpdir: Path, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = _script_env("pgserver")
    env.pop("XDG_RUNTIME_DIR", None)  # as on a server: pgserver's runtime directory is then in TMPDIR
    env["TMPDIR"] = str(tmpdir)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", _PGSERVER_CHILD, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def test_with_pgserver_a_temp_dir_too_long_for_a_socket_still_starts(data_dir):
    """pgserver puts the socket in the data directory, else in its runtime directory (in TMPDIR
    too without XDG_RUNTIME_DIR): with a long TMPDIR `sa-jobs demo` ended in a RuntimeError
    traceback ("Could not find a suitable socket path") and left its initdb'd data directory
    in TMPDIR for good. The data directory is made under /tmp then, as start_local's socket."""
    long_tmp = data_dir.parent / ("t" * 100)
    long_tmp.mkdir()
    long_tmp.chmod(0o755)
    proc = _pgserver_child(long_tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "answer=42" in proc.stdout
    assert "Traceback" not in proc.stderr
    url = proc.stdout.split("url=", 1)[1].strip()
    data = Path(unquote(url.split("host=", 1)[1].split("&", 1)[0]))
    try:
        assert data.parent == Path("/tmp") and data.name.startswith("sa_jobs_pg_")
        assert not data.exists() and not _reachable(url)  # deleted at exit
        assert not list(long_tmp.glob("sa_jobs_pg_*"))
    finally:
        _stop_orphan(data)


def test_with_pgserver_a_start_that_fails_is_one_typed_line(data_dir):
    """A data directory and a TMPDIR both too long for a socket: pgserver's RuntimeError came
    out as a traceback; it is an EmbeddedServerError naming the way out."""
    long_tmp = data_dir.parent / ("t" * 100)
    long_tmp.mkdir()
    long_tmp.chmod(0o755)
    data = long_tmp / "pg"
    proc = _pgserver_child(long_tmp, str(data))
    try:
        assert proc.returncode == 3, proc.stdout + proc.stderr
        [line] = [line for line in proc.stdout.splitlines() if line.startswith("error=")]
        assert "socket" in line and "TMPDIR" in line, line
    finally:
        _stop_orphan(data)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_dismissed_watchdog_exits_at_once_while_a_forked_child_lives(tmp_path):
    """A child the app forked holds a copy of the pipe to the watchdog: the watchdog read to
    the end of the pipe, so at the app's normal exit it waited for that child too, and the
    app's exit waited 5 s (dismiss's timeout) for it in vain."""
    watchdog = _pg_watchdog.spawn("private", tmp_path, tmp_path / "absent", "stop")
    assert watchdog is not None
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only lives on
        time.sleep(60)
        os._exit(0)
    try:
        _pg_watchdog.dismiss(watchdog)
        assert watchdog.returncode == 0  # it exited; before, the wait timed out with it still reading
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        if watchdog.poll() is None:
            watchdog.kill()
            watchdog.wait()


def test_with_pgserver_a_temp_dir_with_a_space_still_starts(data_dir):
    """pgserver hands the socket directory to /bin/sh unquoted (pg_ctl -o "-k <dir>"): with a
    TMPDIR holding a space, postgres got "invalid argument" and the demo did not start."""
    spaced = data_dir.parent / "my temp"
    spaced.mkdir()
    spaced.chmod(0o755)
    proc = _pgserver_child(spaced)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "answer=42" in proc.stdout
    url = proc.stdout.split("url=", 1)[1].strip()
    data = Path(unquote(url.split("host=", 1)[1].split("&", 1)[0]))
    try:
        assert data.parent == Path("/tmp") and not data.exists()
    finally:
        _stop_orphan(data)


def test_with_pgserver_a_data_dir_with_a_space_is_refused_before_anything_starts(data_dir):
    spaced = data_dir.parent / "my data"
    proc = _pgserver_child(data_dir.parent, str(spaced))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "pass a data directory without them" in proc.stdout
    assert not spaced.exists()


_PGSERVER_INTERRUPTED = """
import os, signal, sys, time
import pgserver.postgres_server as pgs

real = getattr(pgs, sys.argv[1])

def interrupted(*args, **kwargs):
    out = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, as the tool returns
    time.sleep(5)
    return out

setattr(pgs, sys.argv[1], interrupted)
from sa_jobs import embedded
try:
    embedded.start(cleanup="delete")
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.parametrize("tool", ["initdb", "pg_ctl"])
def test_with_pgserver_ctrl_c_during_the_start_leaves_nothing_behind(tool, data_dir):
    """Ctrl-C while pgserver ran initdb or pg_ctl start: the cleanup caught Exception only, so
    KeyboardInterrupt passed it by, leaving the initdb'd directory in the temp dir (and after
    pg_ctl, its server running there, unowned), at every interrupted demo."""
    tmp = data_dir.parent
    env = _script_env("pgserver")
    env["TMPDIR"] = str(tmp)
    proc = subprocess.run([sys.executable, "-c", _PGSERVER_INTERRUPTED, tool], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    left = sorted(tmp.glob("sa_jobs_pg_*"))
    try:
        assert proc.stdout.strip() == "interrupted", proc.stdout + proc.stderr
        assert left == []
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(tmp) not in ps
    finally:
        for d in left:
            _stop_orphan(d)


_KILLED_MID_START = """
import os, signal, sys, threading, time
server, tool, signame = sys.argv[1], sys.argv[2], sys.argv[3]


def dies_during(run, name_of):
    def wrapper(*args, **kwargs):
        if name_of(args) == tool:
            def kill():
                time.sleep(0.3 if tool == "initdb" else 0.05)
                os.kill(os.getpid(), getattr(signal, signame))
            threading.Thread(target=kill, daemon=True).start()
        return run(*args, **kwargs)
    return wrapper


if server == "local":
    sys.modules["pgserver"] = None
    from sa_jobs import embedded
    embedded._run = dies_during(embedded._run, lambda args: os.path.basename(str(args[1])))
else:
    import warnings
    warnings.filterwarnings("ignore")
    import pgserver.postgres_server as pgs
    for name in ("initdb", "pg_ctl"):
        setattr(pgs, name, dies_during(getattr(pgs, name), lambda args, name=name: name))
    from sa_jobs import embedded
print("starting", flush=True)
try:
    embedded.start(cleanup="delete")
except KeyboardInterrupt:
    print("interrupted", flush=True)
else:
    print("survived", flush=True)
"""


@pytest.mark.parametrize("server", ["local", "pgserver"])
@pytest.mark.parametrize("tool", ["initdb", "pg_ctl"])
def test_a_process_killed_while_its_server_starts_leaves_nothing_behind(server, tool, data_dir):
    """The watchdog that stops the server of a killed process was started once the server
    was up: a demo killed (``kill -9``, the OOM killer, a CI timeout) during initdb or
    pg_ctl start left the directory in the temp dir, and after pg_ctl (which goes on
    without it) a server running there, for good."""
    _start_cut_short(server, tool, "SIGKILL", data_dir.parent)


@pytest.mark.parametrize("tool", ["initdb", "pg_ctl"])
def test_a_start_interrupted_in_its_process_alone_leaves_nothing_behind(tool, data_dir):
    """A SIGINT to the process alone (``kill -INT``, a supervisor; not the terminal's, which
    reaches the whole group): subprocess.run killed runuser with SIGKILL, which it cannot
    pass on, so initdb went on as root's orphan and wrote the directory anew after the
    cleanup had removed it."""
    _start_cut_short("local", tool, "SIGINT", data_dir.parent)


def _start_cut_short(server: str, tool: str, signame: str, tmp: Path) -> None:
    env = _script_env(server)
    env["TMPDIR"] = str(tmp)
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_START, server, tool, signame], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    if signame == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
        assert proc.stdout.strip() == "starting"
    else:
        assert proc.stdout.split() == ["starting", "interrupted"], proc.stdout + proc.stderr

    def leftovers() -> tuple[list[Path], list[str]]:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        return sorted(tmp.glob("sa_jobs_pg_*")), [line for line in ps.splitlines() if str(tmp) in line]

    deadline = time.monotonic() + 60
    while any(leftovers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    dirs, procs = leftovers()
    try:
        assert (dirs, procs) == ([], [])
    finally:
        for d in dirs:
            _stop_orphan(d)


_as_root = pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="as root only: the server runs as another user")


def _closed_dir(parent: Path) -> Path:
    closed = parent / "private"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    return closed


@_as_root
def test_with_pgserver_as_root_a_private_temp_dir_is_not_opened_to_everyone(data_dir):
    """As root, pgserver chmods every directory above the data directory to g+rx,o+rx so that
    its server's user can reach it: a TMPDIR of root's own (0700, under /root) was opened to
    every user of the machine, silently, by the README's first command."""
    closed = _closed_dir(data_dir.parent)
    inner = closed / "tmp"
    inner.mkdir(mode=0o700)
    proc = _pgserver_child(inner)
    url = proc.stdout.split("url=", 1)[1].strip() if "url=" in proc.stdout else ""
    data = Path(unquote(url.split("host=", 1)[1].split("&", 1)[0])) if url else None
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "answer=42" in proc.stdout
        assert (closed.stat().st_mode & 0o777, inner.stat().st_mode & 0o777) == (0o700, 0o700)
        assert data is not None and data.parent == Path("/tmp")  # made where its user can reach it
    finally:
        if data is not None:
            _stop_orphan(data)


@_as_root
def test_with_pgserver_as_root_a_data_dir_its_user_cannot_reach_is_refused(data_dir):
    closed = _closed_dir(data_dir.parent)
    proc = _pgserver_child(data_dir.parent, str(closed / "pg"))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("error=")]
    assert str(closed) in line and "every user" in line, line
    assert closed.stat().st_mode & 0o777 == 0o700
    assert not (closed / "pg").exists()


_PGSERVER_CLOSED_INSTALL = """
import logging
import sys
from pathlib import Path
import pgserver
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="log=%(message)s")
pgserver.__file__ = str(Path(sys.argv[1]) / "pgserver" / "__init__.py")  # as in a venv under /root
from sa_jobs import EmbeddedServerError, embedded
try:
    print("url=" + embedded.start(cleanup="delete"), flush=True)
except EmbeddedServerError as exc:
    print("error=%s" % exc, flush=True)
"""


@_as_root
def test_with_pgserver_as_root_an_install_its_user_cannot_reach_is_said(data_dir):
    """pgserver installed where its server's user cannot reach (a virtualenv under /root):
    pgserver makes every directory above it enterable by every user. Refusing the install
    (or passing to the machine's PostgreSQL, a first version of this fix) failed the README's
    first command for root in a virtualenv under /root; pgserver still serves, and the log
    says what it opens and how to avoid it. (This stands in for the install's location:
    what pgserver actually opens is the real install's, here an open one.)"""
    closed = _closed_dir(data_dir.parent)
    env = _script_env("pgserver")
    env["TMPDIR"] = str(data_dir.parent)
    proc = subprocess.run([sys.executable, "-c", _PGSERVER_CLOSED_INSTALL, str(closed)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    [warning] = [line for line in lines if line.startswith("log=")]
    assert str(closed) in warning and "every user" in warning and "virtualenv" in warning, warning
    [url] = [line for line in lines if line.startswith("url=")]
    assert "&port=5432" not in url, url  # pgserver's own server, not start_local's


def test_with_pgserver_a_failed_initdb_says_why_in_one_line(data_dir):
    """pgserver's CalledProcessError says only "returned non-zero exit status 1": the reason
    (a data directory that is not empty, a full disk) was in a 30-line ERROR dump pgserver
    logged to stderr before the error line, which named none of it."""
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("not a data directory")
    proc = _pgserver_child(data_dir.parent, str(data_dir))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("error=")]
    assert "initdb" in line and "exists but is not empty" in line, line
    assert proc.stderr == ""
    assert (data_dir / "notes.txt").exists()
    # As root pgserver gave the directory to its server's user (chown) before initdb refused
    # it: someone's own directory was left writable by that user. It is given back.
    assert (data_dir.stat().st_uid, data_dir.stat().st_gid) == (os.geteuid(), os.getegid())


@needs_binaries
def test_without_pgserver_a_data_dir_that_is_no_server_s_is_left_as_it_was(data_dir):
    """As root the server runs as an unprivileged user, so start_local gives the data
    directory to it (chown) before initdb: a directory of the caller's own that initdb then
    refused (not empty, and no data directory) was left owned by that user."""
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("not a data directory")
    mode = data_dir.stat().st_mode
    with pytest.raises(EmbeddedServerError, match="exists but is not empty"):
        embedded.start_local(data_dir)
    assert (data_dir / "notes.txt").read_text() == "not a data directory"
    assert (data_dir.stat().st_uid, data_dir.stat().st_gid, data_dir.stat().st_mode) == (
        os.geteuid(), os.getegid(), mode)


@needs_binaries
def test_without_pgserver_a_temp_dir_with_a_dollar_still_starts(data_dir):
    """pg_ctl hands the data directory and log file to /bin/sh in double quotes, where `$`
    still expands: with TMPDIR=/tmp/a$b;c the server's log went to "/tmp/a;c/..." and the
    start failed ("cannot create ... Directory nonexistent")."""
    odd = data_dir.parent / "a$HOME`x`"
    odd.mkdir()
    odd.chmod(0o755)
    env = _script_env("local")
    env["TMPDIR"] = str(odd)
    code = "import sys; sys.modules['pgserver'] = None; from sa_jobs import embedded; print(embedded.start(cleanup='delete'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    host = Path(unquote(proc.stdout.split("host=", 1)[1].split("&", 1)[0]))
    assert host.parent == Path("/tmp") and not host.exists()
    assert list(odd.iterdir()) == []


@needs_binaries
def test_without_pgserver_a_data_dir_the_shell_would_expand_is_refused(data_dir):
    odd = data_dir.parent / "a$HOME"
    with pytest.raises(EmbeddedServerError, match="pass a data directory without"):
        embedded.start_local(odd, cleanup="delete")
    assert not odd.exists()


def test_with_pgserver_a_failed_server_start_says_why_from_its_log(data_dir):
    """pg_ctl's own stderr says only "could not start server": the reason is in the log."""
    data_dir.mkdir()
    (data_dir / "PG_VERSION").write_text("15\n")  # a data directory gone bad: no postgresql.conf
    proc = _pgserver_child(data_dir.parent, str(data_dir))
    try:
        assert proc.returncode == 3, proc.stdout + proc.stderr
        [line] = [line for line in proc.stdout.splitlines() if line.startswith("error=")]
        assert "pg_ctl failed" in line and "postgresql.conf" in line, line
        assert proc.stderr == ""
    finally:
        _stop_orphan(data_dir)


def test_with_pgserver_a_start_prints_no_warning_even_in_a_locale_the_machine_lacks(data_dir):
    """Two checks of one start (each started a server of its own before):

    - pgserver's initdb takes its locale from the environment: a locale the machine does not
      have (an image with LC_ALL=en_US.UTF-8 and no locales generated, a locale passed on by
      ssh) failed the demo ("invalid locale settings"). start_local gives initdb --locale=C.
    - The XDG_RUNTIME_DIR warning (XDG_RUNTIME_DIR unset, as _pgserver_child leaves it) was
      filtered after `import pgserver`, which is where platformdirs gives it: the README's
      first command printed it first thing."""
    proc = _pgserver_child(data_dir.parent, env_extra={"LC_ALL": "en_XX.UTF-8"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "answer=42" in proc.stdout
    assert proc.stderr == ""


def test_with_pgserver_an_unusable_runtime_dir_still_starts(data_dir):
    """pgserver keeps its lock in XDG_RUNTIME_DIR: one that does not exist and cannot be made
    (a container given XDG_RUNTIME_DIR=/run/user/1000 with no session to make it, where
    /run/user is root's) failed the demo with "No such file or directory" naming neither
    the variable nor the way out, then a 15-line traceback from pgserver's exit handler,
    which tried the lock again. (platformdirs itself passes over one that exists and is
    not the user's.)"""
    proc = _pgserver_child(data_dir.parent, env_extra={"XDG_RUNTIME_DIR": "/proc/sa_jobs_test_absent/run"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "answer=42" in proc.stdout
    assert proc.stderr == ""
