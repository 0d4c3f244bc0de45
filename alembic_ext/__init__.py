"""sa-jobs' queue schema as an Alembic branch that an app includes in its own history.

The app adds one entry to ``version_locations`` (``alembic_ext:versions``, or the path
:func:`version_location` returns) and its ``alembic upgrade heads`` installs the queue next
to its own branch, labelled ``sa_jobs``. The revision scripts call
:mod:`sa_jobs.schema` for their SQL, so Alembic, ``sa-jobs migrate`` and
``sa-jobs migrate --sql`` always apply the same DDL and record the same versions.

In env.py, pass :func:`include_object` and :func:`include_name` to
``context.configure`` so autogenerate never proposes operations for the queue's objects.
"""

from __future__ import annotations

from ._config import SCHEMA_ATTRIBUTE, SCHEMA_OPTION, SCHEMA_X_ARG, configured_schema
from ._filters import include_name, include_object
from ._ops import downgrade_version, upgrade_version
from ._paths import BRANCH_LABEL, VERSIONS_RESOURCE, version_location, versions_path

__all__ = [
    "BRANCH_LABEL",
    "SCHEMA_ATTRIBUTE",
    "SCHEMA_OPTION",
    "SCHEMA_X_ARG",
    "VERSIONS_RESOURCE",
    "configured_schema",
    "downgrade_version",
    "include_name",
    "include_object",
    "upgrade_version",
    "version_location",
    "versions_path",
]
