"""The zero-setup default: a real PostgreSQL started from the ``pgserver`` wheel.

Used by ``sa-jobs demo`` and the test-suite when no database URL is given. The server
listens on a Unix socket inside its data directory's runtime path, never on a TCP port.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from .errors import ConfigurationError

_CLEANUP_MODES = ("stop", "delete", "none")


def start(data_dir: str | os.PathLike[str] | None = None, *, cleanup: str = "stop") -> str:
    """Start (or reuse) an embedded server and return its SQLAlchemy/libpq URL.

    ``cleanup`` is ``"stop"`` (stop at interpreter exit), ``"delete"`` (stop and remove the
    data directory) or ``"none"`` (leave it running).
    """
    import warnings

    if cleanup not in _CLEANUP_MODES:
        # pgserver only asserts it; without asserts (python -O) an unknown mode deleted.
        raise ConfigurationError(f"cleanup must be one of {', '.join(map(repr, _CLEANUP_MODES))}, not {cleanup!r}")
    # pgserver logs every initdb/pg_ctl run at INFO, and platformdirs warns about a
    # missing XDG_RUNTIME_DIR on servers: neither is news to a sa-jobs user.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import pgserver
    except ImportError:  # pragma: no cover - depends on the extra being installed
        raise ConfigurationError(
            "no database URL was given and the embedded server is not installed:"
            " pip install 'sa-jobs[embedded]' or set SA_JOBS_DATABASE_URL"
        ) from None
    path = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="sa_jobs_pg_"))
    path.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(path, cleanup_mode=None if cleanup == "none" else cleanup)
    return server.get_uri()
