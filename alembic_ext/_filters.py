"""Autogenerate filters: the queue's tables are the sa_jobs branch's business, not the app's.

They hide the queue both ways: reflected objects (so ``include_schemas=True`` does not see
tables to drop) and metadata objects (so an app that puts ``sa_jobs.model.Base.metadata``
in ``target_metadata`` gets no "add table"). Chain them with the app's own filters with
``and``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from sa_jobs.schema import JOBS_TABLE, PERIODIC_TABLE, QUEUES_TABLE, VERSION_TABLE

from ._config import configured_schema, default_schema_name

# Every table the branch creates (version 3 added queues and periodic): in a schema shared
# with the app, a missing one was proposed for dropping.
QUEUE_TABLES = frozenset({JOBS_TABLE, VERSION_TABLE, QUEUES_TABLE, PERIODIC_TABLE})

# Columns every version of each queue table has (a version adds, never removes): how a
# reflected table of another sa-jobs queue (a second schema installed by ``sa-jobs
# migrate``, not the configured one) is told from an app's table of the same name. The
# hooks get no connection, so the table's own columns are the evidence.
_QUEUE_COLUMNS: Mapping[str, frozenset[str]] = {
    JOBS_TABLE: frozenset({"id", "kind", "queue", "args", "state", "priority", "attempt", "max_attempts",
                           "scheduled_at", "lease_owner", "claim_token", "lease_expires_at", "errors", "meta"}),
    VERSION_TABLE: frozenset({"version", "description", "installed_at"}),
    QUEUES_TABLE: frozenset({"name", "paused", "updated_at"}),
    PERIODIC_TABLE: frozenset({"name", "last_slot", "updated_at"}),
}


def _is_queue_schema(schema: Optional[str], queue_schema: str) -> bool:
    if schema is None:  # reflection's spelling of the default schema
        return queue_schema == (default_schema_name() or "public")
    return schema == queue_schema


def _is_queue_table(schema: Optional[str], name: Optional[str], queue_schema: str) -> bool:
    return name in QUEUE_TABLES and _is_queue_schema(schema, queue_schema)


def include_name(name: Optional[str], type_: str, parent_names: Mapping[str, Optional[str]]) -> bool:
    """``include_name`` hook: skip reflecting the queue's schema (or its tables in a shared one)."""
    queue_schema = configured_schema()
    if type_ == "schema":
        # A dedicated queue schema is skipped whole; a shared/default one only by table.
        return name is None or name != queue_schema or _is_queue_schema(None, queue_schema)
    if type_ == "table":
        return not _is_queue_table(parent_names.get("schema_name"), name, queue_schema)
    return True


def include_object(object_: Any, name: Optional[str], type_: str, reflected: bool, compare_to: Any) -> bool:
    """``include_object`` hook: no autogenerate operations for any sa-jobs table."""
    if type_ != "table":
        return True  # columns, indexes, constraints follow their table's verdict
    from sa_jobs.model import Base

    if getattr(object_, "metadata", None) is Base.metadata:
        return False
    if reflected and _has_queue_columns(object_, name):
        return False  # any sa-jobs queue's table, in whichever schema (a second queue's too)
    return not _is_queue_table(getattr(object_, "schema", None), name, configured_schema())


def _has_queue_columns(table: Any, name: Optional[str]) -> bool:
    """Whether a reflected ``table`` has every column sa-jobs' table of that ``name`` has."""
    want = _QUEUE_COLUMNS.get(name or "")
    columns = getattr(table, "columns", None)
    return want is not None and columns is not None and want <= {c.name for c in columns}
