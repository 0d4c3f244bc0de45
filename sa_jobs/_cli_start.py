"""Ctrl-C while the ``sa-jobs`` command is still starting (stdlib only).

The command's ``main()`` turns Ctrl-C into one line and exit 130, but before it runs,
Python imports sa_jobs (SQLAlchemy, psycopg, anyio: half a second, more on a cold disk),
and Ctrl-C then printed a KeyboardInterrupt traceback through the import machinery.
Nothing has been done that early, so :func:`guard`, the first thing ``sa_jobs/__init__``
runs, answers Ctrl-C with the command's line and exit 130 until ``main()`` calls
:func:`end` (from then on its own ``except KeyboardInterrupt`` does).

Only in the command's process: started as the ``sa-jobs`` console script (``sys.argv[0]``)
or as ``python -m sa_jobs`` / ``-m sa_jobs.cli`` (``sys.argv[0]`` is still ``"-m"`` while
runpy imports the package). An app, a test run or a script of another name that imports
sa_jobs keeps Python's KeyboardInterrupt; so does a start the check does not recognise
(the traceback, as before).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Optional

# The console script's name as pip writes it (and its Windows launcher's).
_COMMAND_NAMES = frozenset({"sa-jobs", "sa-jobs.exe", "sa-jobs-script.py", "sa-jobs-script.pyw"})
_MODULES = frozenset({"sa_jobs", "sa_jobs.cli"})  # the modules that run main() under -m

INTERRUPTED_LINE = "sa-jobs: interrupted"
INTERRUPTED_EXIT = 128 + 2  # as a process SIGINT ends

_previous: Optional[Any] = None  # the SIGINT handler guard() replaced (Python's default)


def _started_as_command() -> bool:
    argv = getattr(sys, "argv", None)
    if not argv:  # an embedded interpreter
        return False
    if os.path.basename(argv[0]).lower() in _COMMAND_NAMES:
        return True
    if argv[0] != "-m":
        return False
    orig = list(getattr(sys, "orig_argv", ()))
    return any(a == "-m" and b in _MODULES for a, b in zip(orig, orig[1:]))


def _interrupted(signum: int, frame: object) -> None:
    stderr = sys.stderr
    if stderr is not None:  # started with stderr closed: nowhere to say it
        try:
            stderr.write(INTERRUPTED_LINE + "\n")
            stderr.flush()
        except (OSError, ValueError):
            pass
    raise SystemExit(INTERRUPTED_EXIT)


def guard() -> None:
    """In the sa-jobs command's process, at the start of ``import sa_jobs``: Ctrl-C ends it
    with one line and exit 130 until :func:`end`. Elsewhere, nothing."""
    global _previous
    if _previous is not None or not _started_as_command():
        return
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        return
    current = signal.getsignal(signal.SIGINT)
    if current is not signal.default_int_handler:  # ignored (a shell's `cmd &`), or someone's own
        return
    _previous = current
    signal.signal(signal.SIGINT, _interrupted)


def end() -> None:
    """``main()``, inside its own handling of Ctrl-C: Python's KeyboardInterrupt again."""
    global _previous
    if _previous is not None and signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, _previous)
    _previous = None
