"""Stopping an embedded server when the process that started it is gone (stdlib only).

``atexit`` does not run when a process is killed (``kill -9``, or SIGTERM under Python's
default handler): its server would run on, its data directory left in the temp dir, for
good. So each process that holds an embedded server also starts this module as a small
watchdog reading a pipe from it: end of file without a word first means the process died,
and the watchdog does what its ``atexit`` would have. Run by path (``python
_pg_watchdog.py``), it imports no sa-jobs (nor SQLAlchemy): it is up in milliseconds.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# In a data directory: the cleanup mode, postmaster pid and socket directory of a server
# sa-jobs started; every process using that server holds a shared lock on it.
USERS_FILE = "sa_jobs_users"


def postmaster_pid(path: Path) -> int | None:
    """The live process named by ``path``'s postmaster.pid, ready or not, or None."""
    try:
        pid = int((path / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def serving_pid(path: Path) -> int | None:
    """The pid of the server running in ``path`` if it answers on its socket, else None: after
    a crash and a reboot, postmaster.pid's pid may be another process's (a signal for
    the server would reach that one)."""
    try:
        lines = (path / "postmaster.pid").read_text().splitlines()
        pid, port, sock = int(lines[0]), int(lines[3]), lines[4]
        os.kill(pid, 0)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(os.path.join(sock, f".s.PGSQL.{port}"))
    except (OSError, ValueError, IndexError):  # no file, a stale one, or one being written
        return None
    return pid


@contextmanager
def dir_locked(path: Path, *, create: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the data directory: one process at a time starts, joins or
    stops the server in it (the lock dies with its process, so a crash leaves none behind)."""
    while True:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its last user removed it ("delete") while we waited
        if not create:
            raise FileNotFoundError(path)
    try:
        yield
    finally:
        os.close(fd)


def pg_ctl_stop(bin_dir: Path, path: Path, mode: str = "fast") -> bool:
    """``pg_ctl stop``, as the owner of the data directory when we are root (pg_ctl refuses root)."""
    args = [str(bin_dir / "pg_ctl"), "-D", str(path), "-m", mode, "-w", "-t", "60", "stop"]
    if os.geteuid() == 0 and path.stat().st_uid != 0:
        import pwd

        args = ["runuser", "-u", pwd.getpwuid(path.stat().st_uid).pw_name, "--", *args]
    try:
        return subprocess.run(args, capture_output=True, cwd="/").returncode == 0
    except OSError:
        return False


def release(bin_dir: Path, path: Path, fd: int | None, wait: float = 0.0) -> None:
    """Stop the server sa-jobs started in ``path`` and apply its cleanup mode, unless another
    process still uses it (holds a shared lock on its users file): the last one out does.
    ``fd``: this process's open users file, None for a watchdog (whose process is gone).
    ``wait``: how long a shared lock may still be seen before it counts as another user's
    (a watchdog reads the end of its pipe while the dying process may not have closed its
    users file yet: the kernel closes a process's descriptors one by one)."""
    try:
        with dir_locked(path, create=False):
            sock = _release_locked(bin_dir, path, fd, wait)
    except FileNotFoundError:
        return  # removed already
    if sock is not None and sock != path:
        shutil.rmtree(sock, ignore_errors=True)  # made for this server only


def _release_locked(bin_dir: Path, path: Path, fd: int | None, wait: float = 0.0) -> Path | None:
    users = path / USERS_FILE
    if fd is None:
        try:
            fd = os.open(users, os.O_RDONLY)
        except FileNotFoundError:
            return None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return None  # another process still uses it
                time.sleep(0.05)
        try:
            mode, pid, sock = users.read_text().splitlines()[:3]
        except (OSError, ValueError):
            return None
        live = serving_pid(path)
        if live is not None:
            if str(live) != pid:
                return None  # not the server sa-jobs started here: not ours to stop
            pg_ctl_stop(bin_dir, path)
        users.unlink(missing_ok=True)
        if mode == "delete":
            shutil.rmtree(path, ignore_errors=True)
        return Path(sock)
    finally:
        os.close(fd)


def spawn(kind: str, bin_dir: Path, path: Path, mode: str) -> subprocess.Popen[bytes] | None:
    """Start a watchdog for this process's server; None if it cannot be (atexit still acts)."""
    if not sys.executable:
        return None
    try:
        return subprocess.Popen(
            [sys.executable, "-I", __file__, kind, str(bin_dir), str(path), mode],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
            start_new_session=True,  # not in our process group: a Ctrl-C there is our atexit's business
        )
    except OSError:
        return None


def dismiss(watchdog: subprocess.Popen[bytes] | None) -> None:
    """At a normal exit: tell the watchdog its process left cleanly (its atexit does the stop)."""
    if watchdog is None or watchdog.stdin is None:
        return
    try:
        watchdog.stdin.write(b"exit\n")
        watchdog.stdin.close()
        watchdog.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass


def main(argv: list[str]) -> None:
    kind, bin_dir, path, mode = argv[0], Path(argv[1]), Path(argv[2]), argv[3]
    # One line, not to the end of the pipe: a child the process forked holds a copy of its
    # end, and would keep a dismissed watchdog (and the process's exit, waiting) until it exits.
    if sys.stdin.buffer.readline():
        return  # dismissed: a normal exit
    if kind == "shared":
        release(bin_dir, path, None, wait=5.0)
    elif path.is_dir():  # "private": a server in a temporary directory of our own
        stop_private(bin_dir, path)
        if mode == "delete":
            shutil.rmtree(path, ignore_errors=True)


def stop_private(bin_dir: Path, path: Path, settle: float = 90.0) -> None:
    """Stop the server in a directory only its dead process knew, waiting out the initdb or
    ``pg_ctl start`` it died in (they go on without it): removed under a running initdb, the
    directory came back; a postmaster still starting has no socket to be seen by."""
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        at_work = _processes_naming(path)
        pid = postmaster_pid(path)
        if pid is not None and (pid in at_work or serving_pid(path) == pid):
            pg_ctl_stop(bin_dir, path)
        elif not at_work:
            return
        time.sleep(0.1)


def _processes_naming(path: Path) -> set[int]:
    """The pids of the processes (bar this one) with ``path`` in their command line: initdb,
    pg_ctl and the postmaster name their data directory there."""
    needle = os.fsencode(path)
    found: set[int] = set()
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and needle in Path("/proc", entry, "cmdline").read_bytes():
                    found.add(int(entry))
            except OSError:
                continue  # exited, or not ours to read
    else:  # macOS, the BSDs
        try:
            out = subprocess.run(["ps", "-axww", "-o", "pid=,command="], capture_output=True).stdout
        except OSError:
            return found
        found = {int(line.split(None, 1)[0]) for line in out.splitlines() if needle in line}
    found.discard(os.getpid())
    return found


if __name__ == "__main__":
    main(sys.argv[1:])
