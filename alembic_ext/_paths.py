"""Where the branch's revision scripts live, for the app's ``version_locations``."""

from __future__ import annotations

from pathlib import Path

BRANCH_LABEL = "sa_jobs"
# Alembic resolves ``package:path`` entries of version_locations through importlib
# resources, so alembic.ini need not hard-code a site-packages path.
VERSIONS_RESOURCE = "alembic_ext:versions"


def version_location() -> str:
    """Absolute path of the ``sa_jobs`` branch's revision scripts (for ``version_locations``)."""
    return str(Path(__file__).resolve().parent / "versions")


versions_path = version_location
