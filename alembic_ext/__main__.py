"""``python -m alembic_ext`` prints the branch's version location, for scripts and ini files."""

from __future__ import annotations

from ._paths import version_location

if __name__ == "__main__":
    print(version_location())
