"""S1 identifier fuzz, S2 untrusted rows, S4 (args cap, secrets) of the security items.

S1 extends tests/test_schema_sql.py (which holds the f-string/%/.format check and some
schema-name cases) with Hypothesis fuzz over all four name kinds: schema, queue, kind
and channel. Invalid names must raise InvalidIdentifierError before any SQL: the calls
get a URL of a port where nothing listens, so reaching the network would raise
OperationalError instead.
"""

from __future__ import annotations

import ast
import base64
import os
import pickle
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sa_jobs import InvalidArgsError, InvalidIdentifierError, Job, Worker, schema as schema_mod
from sa_jobs.model import KindOptions
from sa_jobs.queries import Queries

from ..helpers import run_worker_until
from .cluster import free_port
from .rel_jobs import RelEcho, RelWork
from .support import scale

PACKAGE = Path(__file__).resolve().parents[2] / "sa_jobs"
NOWHERE = f"postgresql://nobody@127.0.0.1:{free_port()}/none"

NASTY = ['a"b', "a;b", "a\x00b", "%s", "$1", "a'b", "DROP TABLE x", "é", "ß", "a b", "a\nb", "x" * 64,
         "_" * 200, "", "a--b", "a/*b", "\u200b", "Ａ", "a\\b", "1abc", "A" * 129, "pg_jobs", "information_schema"]
names = st.one_of(st.sampled_from(NASTY), st.text(max_size=80),
                  st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=70))

SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")
QUEUE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,62}")
KIND_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,127}")


def _ascii_ok(pattern: re.Pattern[str], value: str) -> bool:
    return value.isascii() and pattern.fullmatch(value) is not None


def _schema_ok(value: str) -> bool:
    """A system schema's name (pg_*, information_schema) is refused too."""
    return _ascii_ok(SCHEMA_RE, value) and not value.startswith("pg_") and value != "information_schema"


@settings(max_examples=scale(300, 5000), deadline=None, suppress_health_check=list(HealthCheck))
@given(name=names)
def test_s1_names_are_validated_before_any_sql(name):
    # Schema (and the channel derived from it): every entry point.
    schema_calls = [
        lambda: schema_mod.install(NOWHERE, name), lambda: schema_mod.uninstall(NOWHERE, name),
        lambda: schema_mod.installed_version(NOWHERE, name), lambda: schema_mod.channel_name(name),
        lambda: Queries.for_schema(name), lambda: schema_mod.upgrade_statements(1, name),
        lambda: Worker(NOWHERE, kinds=[RelWork], schema=name),
    ]
    for call in schema_calls:
        if _schema_ok(name):
            if call is schema_calls[-1] or call in schema_calls[3:6]:
                call()  # valid: builds without touching the server
        else:
            with pytest.raises(InvalidIdentifierError):
                call()
    # Queue names: worker config, per-row option.
    for call in (lambda: Worker(NOWHERE, kinds=[RelWork], queues={name: 1}), lambda: RelWork(ms=1).options(queue=name)):
        if _ascii_ok(QUEUE_RE, name):
            call()
        else:
            with pytest.raises(InvalidIdentifierError):
                call()
    # Kind names: rejected when the class statement runs, before anything is mapped.
    if not _ascii_ok(KIND_RE, name):
        with pytest.raises(InvalidIdentifierError):
            KindOptions(kind=name)
        if name:  # kind="" means "use the class name" (documented default)
            with pytest.raises(InvalidIdentifierError):
                type("Bad", (Job,), {}, kind=name)


def test_s1_valid_odd_names_are_quoted_and_bound(rel_url, db):
    """The oddest valid names work end to end: identifiers quoted, values bound."""
    schema = "_" + "9" * 39
    schema_mod.install(rel_url, schema)
    try:
        q = Queries.for_schema(schema)
        import psycopg

        with psycopg.connect(rel_url, autocommit=True) as conn:
            conn.execute(f'INSERT INTO "{schema}".jobs (kind, queue) VALUES (%s, %s)', ("Z:-.k", "q.:-Q_9"))
            rows = conn.execute(q.claim, {"queue": "q.:-Q_9", "limit": 5, "token": __import__("uuid").uuid4(),
                                          "owner": "o", "lease": 5}).fetchall()
            assert len(rows) == 1 and rows[0][1:3] == ("Z:-.k", "q.:-Q_9")
    finally:
        schema_mod.uninstall(rel_url, schema)


# ---- S2 --------------------------------------------------------------------------------------

class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sa_jobs_rel_pwned",))


EVIL_KINDS = ["os.system", "subprocess.Popen", "builtins.eval", "__import__", "pickle.loads"]


def test_s2_untrusted_rows_are_never_imported_or_instantiated(db, rel_url, rel_schema):
    sentinel = Path("/tmp/sa_jobs_rel_pwned")
    sentinel.unlink(missing_ok=True)
    blob = pickle.dumps(_Boom())
    evil_args = {
        "pickle_b64": base64.b64encode(blob).decode(),
        "pickle_latin1": blob.replace(b"\x00", b"").decode("latin1"),  # jsonb text holds no NUL
        "cls": {"__class__": "os.system", "__reduce__": ["os.system", ["touch /tmp/sa_jobs_rel_pwned"]]},
        "py": {"py/object": "subprocess.Popen", "args": ["id"]},
    }
    import json

    for kind in EVIL_KINDS:
        db.q("INSERT INTO {jobs} (kind, queue, args, max_attempts) VALUES (%s, 'rel', %s::jsonb, 3)",
             (kind, json.dumps({"cmd": "touch /tmp/sa_jobs_rel_pwned", **evil_args})))
    db.q("INSERT INTO {jobs} (kind, queue, args, max_attempts) VALUES ('rel_echo', 'rel', %s::jsonb, 1)",
         (json.dumps(evil_args),))
    run_worker_until(rel_url, rel_schema, [RelEcho], lambda: db.states().keys() <= {"retryable", "completed"}, timeout=30)
    assert not sentinel.exists()
    # Unknown kinds fail like any attempt (retried with backoff: a newer worker may know them).
    failed = db.q("SELECT kind, attempt, errors->-1->>'error' FROM {jobs} WHERE state = 'retryable' ORDER BY kind")
    assert sorted(k for k, _, _ in failed) == sorted(EVIL_KINDS)
    for kind, attempt, error in failed:
        assert attempt == 1 and error.startswith("UnknownKindError: no handler for kind"), (kind, error)
    # The known kind got plain JSON values: strings stay strings, dicts stay dicts.
    assert db.q("SELECT result FROM {jobs} WHERE kind = 'rel_echo'") == [
        ({"pickle_b64": "str", "pickle_latin1": "str", "cls": "dict", "py": "dict"},)]
    # Bytes (a pickle) cannot even be enqueued: args are JSON, checked at construction.
    with pytest.raises(InvalidArgsError):
        RelEcho(blob=blob)
    with pytest.raises(InvalidArgsError):
        RelEcho(obj=_Boom())


FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle", "yaml"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def test_s2_package_has_no_pickle_marshal_or_eval():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                offenders += [(path.name, a.name) for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                offenders.append((path.name, node.module))
            elif isinstance(node, ast.Call):
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
                if isinstance(fn, ast.Name) and name in FORBIDDEN_CALLS:
                    offenders.append((path.name, name))
                # Importing by name is for the CLI's own module arguments, never job data.
                if name == "import_module" and path.name != "cli.py":
                    offenders.append((path.name, name))
    assert offenders == []


# ---- S4 (args cap) ------------------------------------------------------------------------------

class RelCapped(Job, kind="rel_capped", queue="rel", max_args_bytes=1024):
    """A kind with a smaller args cap."""


def test_s4_args_over_the_cap_are_rejected_at_construction():
    RelEcho(blob="x" * (256 * 1024 - 20))
    with pytest.raises(InvalidArgsError):
        RelEcho(blob="x" * (256 * 1024))
    RelCapped(blob="x" * 1000)
    with pytest.raises(InvalidArgsError):
        RelCapped(blob="x" * 1024)
