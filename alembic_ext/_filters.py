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

# Tables every queue schema has (version 1 on): a schema whose reflected table names include
# them is another sa-jobs queue (a second schema installed by ``sa-jobs migrate``, not the
# configured one). The hooks get no connection; include_name() is told, first, each schema
# an autogenerate run reflects and then each of its table names, before any include_object()
# of a reflected table, so it notes them for the run.
_QUEUE_SCHEMA_EVIDENCE = frozenset({JOBS_TABLE, VERSION_TABLE})
_reflected_tables: dict[Optional[str], set[str]] = {}


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
        _reflected_tables[name] = set()  # a new run's reflection of it: forget the last one's
        # A dedicated queue schema is skipped whole; a shared/default one only by table.
        return name is None or name != queue_schema or _is_queue_schema(None, queue_schema)
    if type_ == "table":
        schema = parent_names.get("schema_name")
        if name is not None:
            _reflected_tables.setdefault(schema, set()).add(name)
        return not _is_queue_table(schema, name, queue_schema)
    return True


def include_object(object_: Any, name: Optional[str], type_: str, reflected: bool, compare_to: Any) -> bool:
    """``include_object`` hook: no autogenerate operations for any sa-jobs table: the
    configured queue's, and a reflected one of a schema :func:`include_name` saw holding
    a queue's tables (another queue's)."""
    if type_ != "table":
        return True  # columns, indexes, constraints follow their table's verdict
    from sa_jobs.model import Base

    if getattr(object_, "metadata", None) is Base.metadata:
        return False
    schema = getattr(object_, "schema", None)
    if reflected and name in QUEUE_TABLES and _QUEUE_SCHEMA_EVIDENCE <= _reflected_tables.get(schema, set()):
        # Another queue's table, told by its schema and name: by its columns alone, an app's
        # own table (a ``queues`` of names and pause flags) was hidden in any schema.
        return False
    return not _is_queue_table(schema, name, configured_schema())
