"""sa-jobs jobs|queues|dead|prune: the operator's commands against a real queue."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Iterator

import psycopg
import pytest
from psycopg import sql

from sa_jobs import cli
from sa_jobs import schema as schema_mod
from sa_jobs._url import to_conninfo

from .conftest import REPO_ROOT, new_schema_name
from .helpers import jobs_sql, q


def run(capsys, database_url, schema, *argv):
    """Run the CLI in-process; (exit code, stdout, stderr). Usage errors exit 2."""
    try:
        code = cli.main([*argv, "--database-url", database_url, "--schema", schema])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def shared_schema(database_url):
    """One installed queue schema for the tests whose command is refused before it acts, or
    never reaches this server: a schema of their own each (installed, then dropped) cost more
    than their command. Nothing may be written to it, which its teardown checks."""
    name = new_schema_name()
    schema_mod.install(database_url, name)
    yield name
    try:
        for table in ("jobs", "queues", "periodic"):
            rows = q(database_url, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name, table)))
            assert rows == [(0,)], f"a refused command wrote to {name}.{table}"
    finally:
        q(database_url, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))  # as the plugin's


@pytest.fixture
def seeded(database_url, schema):
    """Jobs in every interesting state, in two queues and three kinds."""
    insert = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, args, attempt, created_at, errors, claim_token,"
                              " lease_expires_at) VALUES (%s, %s, %s, '{{}}', %s, now() - %s::interval, %s::jsonb,"
                              " CASE WHEN %s = 'running' THEN gen_random_uuid() END,"
                              " CASE WHEN %s = 'running' THEN now() + interval '1 hour' END)")
    rows = [
        ("mail", "emails", "available", 0, "1 minute", None, "[]"),
        ("mail", "emails", "dead", 3, "3 days", "now", '[{"attempt": 3, "error": "SMTPError: refused\\nmore"}]'),
        ("mail", "emails", "dead", 3, "1 hour", "now", '[{"attempt": 3, "error": "SMTPError: timeout"}]'),
        ("report", "default", "completed", 1, "10 days", "old", "[]"),
        ("report", "default", "running", 1, "1 minute", None, "[]"),
        ("resize", "media", "dead", 5, "2 days", "now", "[]"),
    ]
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:  # one connection, not one a row
        for kind, queue, state, attempt, age, finished, errors in rows:
            finished_sql = {"now": "now()", "old": "now() - interval '9 days'", None: None}[finished]
            conn.execute(insert, (kind, queue, state, attempt, age, errors, state, state))
            if finished_sql:
                conn.execute(jobs_sql(schema, "UPDATE {jobs} SET finished_at = " + finished_sql + " WHERE id = (SELECT max(id) FROM {jobs})"))
        return [r[0] for r in conn.execute(jobs_sql(schema, "SELECT id FROM {jobs} ORDER BY id"))]


def test_jobs_list_table_and_json_with_filters(capsys, database_url, schema, seeded):
    code, out, _ = run(capsys, database_url, schema, "jobs", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "KIND", "QUEUE", "STATE"] and len(lines) == 7
    assert "SMTPError: refused" in out and "more" not in out  # the last error's first line
    code, out, _ = run(capsys, database_url, schema, "jobs", "list", "--json", "--kind", "mail", "--state", "dead")
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [seeded[2], seeded[1]]  # newest first
    code, out, _ = run(capsys, database_url, schema, "jobs", "list", "--json", "--state", "dead", "--older-than", "1d")
    assert sorted(r["id"] for r in json.loads(out)) == [seeded[1], seeded[5]]
    code, out, _ = run(capsys, database_url, schema, "jobs", "list", "--json", "--queue", "media", "--newer-than", "1w")
    assert [r["kind"] for r in json.loads(out)] == ["resize"]


def test_jobs_show(capsys, database_url, schema, seeded):
    code, out, _ = run(capsys, database_url, schema, "jobs", "show", str(seeded[1]))
    assert code == 0 and "SMTPError: refused" in out and "emails" in out
    code, out, _ = run(capsys, database_url, schema, "jobs", "show", str(seeded[1]), "--json")
    job = json.loads(out)
    assert job["id"] == seeded[1] and job["state"] == "dead" and job["errors"][0]["attempt"] == 3
    code, _, err = run(capsys, database_url, schema, "jobs", "show", "999999")
    assert code == 1 and err == "sa-jobs: no job 999999\n", err  # ran, found nothing: as `jobs retry 999999`


def test_jobs_show_json_is_valid_json_with_every_number_exact(capsys, database_url, schema):
    """A number in args or result that a float does not hold (written by a producer in
    another language, or by SQL): `jobs show --json` printed `Infinity` (no JSON parser
    but Python's takes it), 0.0 for 2.5e-400 and 12345678901234568.0 for a 19-digit amount,
    where --json keeps every value exact. The text view shows them as stored too."""
    from decimal import Decimal

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    huge = "9" * 400 + ".5"
    job = q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, args, result) VALUES ('num',"
                                           " jsonb_build_object('huge', %s::numeric, 'amount', 12345678901234567.89,"
                                           " 'ratio', 0.1, 'n', 7, 'list', jsonb_build_array(1.50, -0.0)),"
                                           " '2.5e-400'::jsonb) RETURNING id"), (huge,))[0][0]
    code, out, err = run(capsys, database_url, schema, "jobs", "show", str(job), "--json")
    assert code == 0, err
    shown = json.loads(out, parse_float=Decimal, parse_constant=refuse)
    assert shown["args"] == {"huge": Decimal(huge), "amount": Decimal("12345678901234567.89"), "ratio": Decimal("0.1"),
                             "n": 7, "list": [Decimal("1.50"), Decimal("-0.0")]}
    assert shown["result"] == Decimal("2.5e-400") and shown["id"] == job
    code, out, err = run(capsys, database_url, schema, "jobs", "show", str(job))
    assert code == 0 and '"amount": 12345678901234567.89' in out and huge in out and "Infinity" not in out, out + err


@pytest.mark.parametrize("errors, shown", [
    ('["refused", 3, null]', ['"refused"', "3", "null"]),
    ('{"error": "boom"}', ['"error": "boom"']),
    ('[{"attempt": 1, "error": "first"}, "second"]', ["#1 : first", '"second"']),
])
def test_jobs_show_prints_errors_the_worker_did_not_write(capsys, database_url, schema, errors, shown):
    """`errors` entries that are not the worker's objects (a row written by SQL or another
    producer): the text view failed with an AttributeError traceback ('str' object has no
    attribute 'get'), on the command an operator inspects such a row with."""
    job = q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, errors) VALUES ('odd', %s::jsonb) RETURNING id"),
            (errors,))[0][0]
    code, out, err = run(capsys, database_url, schema, "jobs", "show", str(job))
    assert code == 0 and "Traceback" not in err, err
    for text in shown:
        assert text in out, out


def test_jobs_show_leaves_out_an_earlier_attempts_progress(capsys, database_url, schema, seeded):
    """A job waiting for its attempt 4 showed attempt 3's progress as its own."""
    set_progress = jobs_sql(schema, "UPDATE {jobs} SET progress = %s::jsonb WHERE id = %s")
    q(database_url, set_progress, ('{"percent": 80, "message": "uploading", "attempt": 3}', seeded[1]))
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'retryable' WHERE id = %s"), (seeded[1],))
    code, out, _ = run(capsys, database_url, schema, "jobs", "show", str(seeded[1]))
    assert code == 0 and "uploading" not in out
    code, out, _ = run(capsys, database_url, schema, "jobs", "show", str(seeded[1]), "--json")
    assert json.loads(out)["progress"] is None
    # The running job's own report (attempt 1) is shown.
    q(database_url, set_progress, ('{"percent": 40, "message": "resizing", "attempt": 1}', seeded[4]))
    code, out, _ = run(capsys, database_url, schema, "jobs", "show", str(seeded[4]))
    assert code == 0 and "resizing" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (("jobs", "show", "abc"), "invalid job id 'abc'"),
        (("jobs", "show", "0"), "positive integers"),
        (("jobs", "list", "--state", "done"), "invalid state 'done'"),
        (("jobs", "list", "--queue", "bad queue"), "invalid queue name"),
        (("jobs", "list", "--kind", "1;drop"), "invalid kind name"),
        (("jobs", "list", "--older-than", "yesterday"), "invalid age 'yesterday'"),
        (("jobs", "delete",), "give job ids or at least one filter"),
        (("dead", "replay",), "--kind"),
        # --limit was ignored: all three jobs were deleted.
        (("jobs", "delete", "1", "2", "3", "--limit", "1"), "--limit caps a filter's matches"),
        (("queues", "pause", "no spaces"), "invalid queue name"),
        # --clear won and the limit given with it was dropped, silently (exit 0).
        (("queues", "limit", "q", "--concurrency", "5", "--clear"), "--clear removes every limit: give it alone"),
        (("prune", "--older-than", "7d", "--state", "running"), "invalid choice: 'running'"),
        (("--log-level", "verbose", "jobs", "list"), "unknown log level 'verbose'"),
        # The worker's own refusals exit 2 as well (a non-integer concurrency exited 1, a
        # concurrency of 0 exited 2).
        (("worker", "tests.jobs_core", "--queue", "core=abc"), "the concurrency after '=' must be an integer"),
        (("worker", "tests.no_such_module"), "cannot import 'tests.no_such_module'"),
        # A file's path for a module's name: TypeError and ValueError tracebacks from importlib
        # ("the 'package' argument is required", "Empty module name"), or "No module named".
        (("worker", "./tests/jobs_core.py"), "a module's name such as myapp.jobs, not a file's path"),
        (("worker", "tests/jobs_core.py"), "a module's name such as myapp.jobs, not a file's path"),
        (("worker", ".tests"), "'.tests' is not a module's name"),
        (("worker", ""), "'' is not a module's name"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(capsys, database_url, shared_schema, argv, message):
    code, _, err = run(capsys, database_url, shared_schema, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_retry_cancel_delete_by_id_report_what_was_not_done(capsys, database_url, schema, seeded):
    available, dead1, dead2, completed, running, dead3 = seeded
    code, out, err = run(capsys, database_url, schema, "jobs", "retry", str(dead1), str(running))
    assert code == 1 and "1 job(s) retried" in out and f"job {running}: not retried" in err
    code, out, _ = run(capsys, database_url, schema, "jobs", "cancel", str(available), "--json")
    assert code == 0 and json.loads(out) == {"cancelled": [available], "not_cancelled": []}
    code, out, err = run(capsys, database_url, schema, "jobs", "delete", str(completed), str(running), "999999")
    assert code == 1 and "1 job(s) deleted" in out and f"job {running}" in err and "job 999999" in err
    states = dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}")))
    assert states[dead1] == "available" and states[available] == "cancelled"
    assert completed not in states and states[running] == "running"


def test_delete_by_filter_with_progress_bar(capsys, database_url, schema, seeded):
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, finished_at) SELECT 'bulk', 'b', 'completed', now()"
                                     " FROM generate_series(1, 250)"))
    code, out, err = run(capsys, database_url, schema, "jobs", "delete", "--kind", "bulk", "--batch", "100", "--progress")
    assert code == 0 and "250 job(s) deleted" in out
    assert "250/250" in err and "100/250" in err and "[" in err
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE kind = 'bulk'")) == [(0,)]


def test_dead_replay_in_bulk(capsys, database_url, schema, seeded):
    code, out, _ = run(capsys, database_url, schema, "dead", "replay", "--kind", "mail", "--json")
    assert code == 0 and json.loads(out)["replayed"] == [seeded[1], seeded[2]]
    rows = q(database_url, jobs_sql(schema, "SELECT id, state, max_attempts >= attempt + 1 FROM {jobs} WHERE kind = 'mail' ORDER BY id"))
    assert [(r[1], r[2]) for r in rows] == [("available", True)] * 3
    code, out, _ = run(capsys, database_url, schema, "dead", "replay", "--all-kinds", "--older-than", "1d")
    assert code == 0 and "1 job(s) replayed" in out  # the resize job


def test_queues_overview_pause_resume(capsys, database_url, schema, seeded):
    code, out, _ = run(capsys, database_url, schema, "queues", "pause", "emails")
    assert code == 0 and "queue emails: paused" in out
    code, out, _ = run(capsys, database_url, schema, "queues", "--json")
    rows = {r["queue"]: r for r in json.loads(out)}
    assert rows["emails"]["paused"] is True and rows["emails"]["dead"] == 2 and rows["emails"]["available"] == 1
    assert rows["default"]["running"] == 1 and rows["default"]["paused"] is False
    code, out, _ = run(capsys, database_url, schema, "queues")
    assert out.splitlines()[0].split()[:3] == ["QUEUE", "SCHEDULED", "AVAILABLE"] and "yes" in out
    code, out, _ = run(capsys, database_url, schema, "queues", "--json", "resume", "emails")
    assert json.loads(out) == {"queue": "emails", "paused": False}


def test_pausing_or_limiting_a_queue_nobody_knows_warns(capsys, database_url, schema, seeded):
    """`queues pause emials` created a row for the mistyped name and said "paused": the real
    queue ran on and nothing told the operator. It still pauses (a queue may be paused
    before its first job), but says on stderr that no job or setting ever named it."""
    code, out, err = run(capsys, database_url, schema, "queues", "pause", "emials")
    assert code == 0 and "queue emials: paused" in out
    assert "warning: no job and no earlier setting names queue 'emials'" in err, err
    code, _, err = run(capsys, database_url, schema, "queues", "limit", "reprots", "--concurrency", "2")
    assert code == 0 and "queue 'reprots'" in err, err
    # A queue with jobs, or one set before, is known: no warning.
    for argv in (["queues", "pause", "emails"], ["queues", "resume", "emials"],
                 ["queues", "limit", "default", "--concurrency", "3"]):
        code, _, err = run(capsys, database_url, schema, *argv)
        assert code == 0 and "warning" not in err, (argv, err)


@pytest.mark.parametrize(
    "argv, shape",
    [
        (("jobs", "list", "--kind", "mial"), None),
        (("jobs", "list", "--json", "--kind", "mial"), []),
        (("jobs", "retry", "--kind", "mial", "--json"), {"retried": [], "not_retried": []}),
        (("jobs", "cancel", "--kind", "mial"), None),
        (("jobs", "delete", "--kind", "mial", "--state", "dead"), None),
        (("dead", "replay", "--kind", "mial", "--json"), {"replayed": [], "not_replayed": []}),
    ],
)
def test_a_kind_no_job_has_is_named_on_stderr_with_the_kinds_there_are(capsys, database_url, schema, seeded, argv,
                                                                         shape):
    """A mistyped --kind matched nothing and the command said only "0 job(s) cancelled" (or
    "no jobs match"), exit 0: the operator took the queue to be clean. It still runs as
    given (exit and --json unchanged), and says on stderr that no job has that kind,
    naming the kinds that do."""
    code, out, err = run(capsys, database_url, schema, *argv)
    assert code == 0, err
    if shape is not None:
        assert json.loads(out) == shape
    assert "sa-jobs: warning: no job has kind 'mial' (kinds with jobs: mail, report, resize)" in err, err
    assert len(q(database_url, jobs_sql(schema, "SELECT id FROM {jobs}"))) == len(seeded)


def test_a_queue_no_job_or_setting_names_is_named_on_stderr_with_the_queues_there_are(capsys, database_url, schema,
                                                                                       seeded):
    code, out, err = run(capsys, database_url, schema, "jobs", "cancel", "--queue", "emials", "--json")
    assert code == 0 and json.loads(out) == {"cancelled": [], "not_cancelled": []}, err
    assert ("sa-jobs: warning: no job and no queue setting names queue 'emials'"
            " (queues: default, emails, media)") in err, err
    # One mistyped name among good ones: the others are acted on, the mistyped one named.
    code, out, err = run(capsys, database_url, schema, "jobs", "list", "--queue", "emails", "--queue", "meida")
    assert code == 0 and "mail" in out and "queue 'meida'" in err and "'emails'" not in err, err
    code, out, err = run(capsys, database_url, schema, "jobs", "delete", "--kind", "report", "--kind", "reprot")
    assert code == 0 and "1 job(s) deleted" in out and "kind 'reprot'" in err and "'report'" not in err, err


def test_a_known_kind_or_queue_without_matches_is_no_warning(capsys, database_url, schema, seeded):
    """No hint for a name that some job (or a queue setting) has: its filter matched nothing
    for another reason (a state, an age)."""
    __import__("tests.jobs_core")  # declares core_noop (queue core): none of its jobs here

    run(capsys, database_url, schema, "queues", "pause", "later")  # set up before its first job
    for argv in (("jobs", "list", "--kind", "core_noop"),
                 ("jobs", "cancel", "--queue", "core"),
("jobs", "list", "--kind", "report", "--state", "dead"),
                 ("jobs", "list", "--queue", "later"),
                 ("jobs", "cancel", "--queue", "media", "--kind", "resize"),  # dead: nothing to cancel
                 ("dead", "replay", "--kind", "mail", "--older-than", "30d"),
                 ("jobs", "list", "--kind", "mail", "--kind", "resize")):
        code, _, err = run(capsys, database_url, schema, *argv)
        assert code == 0 and "warning" not in err, (argv, err)


def test_prune_command(capsys, database_url, schema, seeded):
    code, out, _ = run(capsys, database_url, schema, "prune", "--older-than", "7d", "--dry-run")
    assert code == 0 and "completed: would delete 1 job(s)" in out
    code, out, _ = run(capsys, database_url, schema, "prune", "--older-than", "7d", "--state", "completed", "--json")
    assert json.loads(out) == {"dry_run": False, "deleted": {"completed": 1}}
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs}")) == [(5,)]


def test_a_dry_run_prune_in_json_says_would_delete_not_deleted(capsys, database_url, schema, seeded):
    """`prune --dry-run --json` named its counts "deleted" while it deleted nothing: a script
    reading that key took a count for rows gone. A dry run names them "would_delete"."""
    code, out, err = run(capsys, database_url, schema, "prune", "--older-than", "7d", "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out) == {"dry_run": True, "would_delete": {"completed": 1, "cancelled": 0, "dead": 0}}
    code, out, _ = run(capsys, database_url, schema, "prune", "--older-than", "7d", "--dry-run")
    assert code == 0 and "completed: would delete 1 job(s)" in out and "deleted" not in out
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs}")) == [(6,)]


def test_the_installed_command_runs(database_url, schema, seeded):
    """The console entry point end to end, as an operator types it."""
    proc = subprocess.run(
        [sys.executable, "-m", "sa_jobs", "jobs", "list", "--state", "dead", "--json",
         "--database-url", database_url, "--schema", schema],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 3


def test_retry_and_replay_skip_a_unique_job_whose_key_is_held_again(capsys, database_url, schema):
    insert = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, attempt, finished_at, unique_key, unique_states)"
                              " VALUES (%s, 'default', %s, 1, CASE WHEN %s <> 'available' THEN now() END, %s,"
                              " CASE WHEN %s::text IS NOT NULL THEN '{{scheduled,available,running,retryable}}'::text[] END)"
                              " RETURNING id")

    def add(kind, state, key=None):
        return q(database_url, insert, (kind, state, state, key, key))[0][0]

    blocked = add("uq", "dead", "key-1")
    holder = add("uq", "available", "key-1")
    free = add("uq", "dead", "key-2")
    plain = add("uq", "dead")
    code, out, err = run(capsys, database_url, schema, "jobs", "retry", str(blocked), str(free))
    assert code == 1 and "1 job(s) retried" in out and f"job {blocked}: not retried" in err and "Traceback" not in err
    code, out, err = run(capsys, database_url, schema, "dead", "replay", "--kind", "uq", "--json")
    assert code == 0 and json.loads(out) == {"replayed": [plain], "not_replayed": [blocked]}
    code, out, err = run(capsys, database_url, schema, "retry", str(blocked))
    assert code == 1 and f"job {blocked}: not found" in err and "Traceback" not in err
    states = dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}")))
    assert states == {blocked: "dead", holder: "available", free: "available", plain: "available"}


@pytest.mark.parametrize("url", ["postgresql://h:notaport/db", "postgresql://h:/db"])
def test_a_url_with_a_bad_port_is_refused_with_a_clear_error(capsys, shared_schema, url):
    code, _, err = run(capsys, url, shared_schema, "jobs", "list")
    assert code == 2 and "not a database URL" in err and "Traceback" not in err


@pytest.mark.parametrize("url", [
    "postgresql://ops:s3cr3t@h:notaport/db",
    "postgresql://ops:s3cr3t@with@at@h:notaport/db",  # an unescaped @ in the password
    "postgresql://ops@h:notaport/db?password=s3cr3t",
])
@pytest.mark.parametrize("argv", [("jobs", "list"), ("migrate",), ("prune", "--older-than", "1d")])
def test_a_refused_url_never_prints_its_password(capsys, shared_schema, url, argv):
    """The error names the URL so the operator sees what was wrong, but terminals and CI
    logs must not receive the password it carries."""
    code, out, err = run(capsys, url, shared_schema, *argv)
    assert code == 2 and "not a database URL" in err and "h:notaport" in err
    assert "s3cr3t" not in out + err and "Traceback" not in err


@pytest.mark.parametrize("argv", [("jobs", "list"), ("prune", "--older-than", "1d"), ("migrate",)], ids=" ".join)
def test_an_option_libpq_does_not_know_is_refused_in_one_line(capsys, database_url, shared_schema, argv):
    """asyncpg's ``?ssl=require`` in the URL: psycopg's message ends in a newline, and the
    refusal went out as two lines, its hint on a line of its own after a leading blank."""
    from sqlalchemy import make_url

    # Added to the query, not appended: the embedded server's URL has one (?host=...).
    url = make_url(database_url).update_query_dict({"ssl": "require"}).render_as_string(hide_password=False)
    code, out, err = run(capsys, url, shared_schema, *argv)
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert err == ('sa-jobs: invalid connection option "ssl" in the database URL\'s query; sa-jobs connects with'
                   " libpq, whose options apply (sslmode=require, not ssl=require)\n"), err


OPERATOR_COMMANDS = [
    ("jobs", "list"), ("jobs", "list", "--json"), ("jobs", "show", "1"), ("jobs", "retry", "1"),
    ("jobs", "cancel", "--state", "available"), ("jobs", "delete", "1"), ("queues",), ("queues", "pause", "q"),
    ("queues", "limit", "q", "--concurrency", "2"), ("dead", "replay", "--all-kinds"),
    ("prune", "--older-than", "1d"), ("retry", "1"),
]


@pytest.mark.parametrize("argv", OPERATOR_COMMANDS, ids=" ".join)
def test_a_schema_not_installed_or_older_is_one_line_naming_the_fix(capsys, database_url, argv):
    """Not a traceback through the driver (undefined table or column): the operator is told
    the version found and the command that fixes it, as the worker tells at start."""
    from sa_jobs import schema as schema_mod

    from .conftest import new_schema_name

    missing = new_schema_name()
    code, out, err = run(capsys, database_url, missing, *argv)
    assert code == 2 and "Traceback" not in err and out == "", err
    assert f"is at version 0 but this sa-jobs needs {schema_mod.LATEST_VERSION}" in err
    assert f"sa-jobs migrate --schema {missing}" in err
    older = new_schema_name()
    schema_mod.install(database_url, older, to_version=3)
    try:
        code, out, err = run(capsys, database_url, older, *argv)
        assert code == 2 and "Traceback" not in err and "is at version 3" in err, err
    finally:
        schema_mod.uninstall(database_url, older)


@pytest.mark.parametrize("argv", [*OPERATOR_COMMANDS, ("migrate",), ("check",)], ids=" ".join)
def test_an_unreachable_server_is_one_line(capsys, shared_schema, argv):
    code, out, err = run(capsys, "postgresql://ops:s3cr3t@127.0.0.1:1/db", shared_schema, *argv)
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert err.startswith("sa-jobs: database error: connection failed") and len(err.splitlines()) == 1, err
    assert "s3cr3t" not in err


def test_a_password_with_a_space_and_url_specials_connects(capsys, database_url, schema, seeded):
    """A correctly percent-encoded password holding a space: libpq refused the URL that
    to_conninfo rendered again (SQLAlchemy leaves the space raw), quoting the password in
    its error; every raw-psycopg path (install, check, prune, the worker) failed."""
    from sqlalchemy.engine import make_url

    from sa_jobs import schema as schema_mod
    from sa_jobs.drift import check_drift

    # A role of its own with that password: works whether the server trusts or checks.
    password = "s3 cr@t:/%?#'"
    role = "t_pw_" + schema
    q(database_url, sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(sql.Identifier(role), sql.Literal(password)))
    try:
        url = make_url(database_url).set(username=role, password=password).render_as_string(hide_password=False)
        assert schema_mod.install(url, schema) == schema_mod.LATEST_VERSION
        assert check_drift(url, schema) == []
        code, out, err = run(capsys, url, schema, "jobs", "list", "--json")
        assert code == 0 and len(json.loads(out)) == len(seeded), err
        code, out, err = run(capsys, url, schema, "prune", "--older-than", "7d", "--dry-run", "--json")
        assert code == 0 and json.loads(out)["would_delete"]["completed"] == 1, err
    finally:
        q(database_url, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_ctrl_c_while_the_worker_imports_its_modules_is_one_line(tmp_path):
    """SIGINT before the worker's own signal handlers are in (here while it imports a slow
    module) printed a KeyboardInterrupt traceback through importlib. Nothing can have been
    claimed yet; it exits as a process SIGINT ends, with one line."""
    import os
    import signal
    import time

    (tmp_path / "slow_jobs_module.py").write_text("import time\nprint('importing', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sa_jobs", "worker", "slow_jobs_module",
         "--database-url", "postgresql://postgres@127.0.0.1:1/unused"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{tmp_path}"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "importing"
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "sa-jobs: interrupted", err


# Loaded by `site` at start-up (PYTHONPATH): importing sa_jobs (its sa_jobs.admin) stops
# here for a minute, after saying so, as a slow disk or a cold cache makes it (0.5 s).
_SLOW_SA_JOBS_IMPORT = """
import sys, time

class _SlowImport:
    def find_spec(self, name, path=None, target=None):
        if name == "sa_jobs.admin":
            sys.meta_path.remove(self)
            print("importing", flush=True)
            time.sleep(60)
        return None

sys.meta_path.insert(0, _SlowImport())
"""

# The console script pip writes for `sa-jobs = "sa_jobs.cli:main"` (as in the venv's bin/).
_CONSOLE_SCRIPT = """import re
import sys
from sa_jobs.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


@pytest.mark.parametrize("entry", ["console script", "python -m sa_jobs"])
def test_ctrl_c_while_sa_jobs_itself_imports_is_one_line(tmp_path, entry):
    """Ctrl-C while `sa-jobs ...` still imports sa_jobs (half a second of SQLAlchemy,
    psycopg, anyio, before main() and its handlers run) printed a KeyboardInterrupt
    traceback through the import machinery, and the process died of SIGINT (-2). Nothing
    has been done yet: one line and exit 130, as everywhere else in the CLI."""
    import os
    import signal

    (tmp_path / "sitecustomize.py").write_text(_SLOW_SA_JOBS_IMPORT)
    (tmp_path / "sa-jobs").write_text(_CONSOLE_SCRIPT)
    start = [str(tmp_path / "sa-jobs")] if entry == "console script" else ["-m", "sa_jobs"]
    proc = subprocess.Popen(
        [sys.executable, *start, "jobs", "list", "--database-url", "postgresql://postgres@127.0.0.1:1/unused"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO_ROOT}"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "importing"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err)
    assert err.strip().splitlines() == ["sa-jobs: interrupted"] and out == "", err


def test_ctrl_c_while_main_parses_its_arguments_is_one_line(capsys, monkeypatch):
    """Between the import and a command's own handling, main() parsed its arguments outside
    any: Ctrl-C there came out of main() as KeyboardInterrupt (a traceback)."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["jobs", "list"]) == 130
    assert capsys.readouterr().err == "sa-jobs: interrupted\n"


def test_importing_sa_jobs_in_an_app_leaves_ctrl_c_alone():
    """What the CLI does at start-up to Ctrl-C is the CLI's only: an app (or a script
    named otherwise) that imports sa_jobs keeps Python's KeyboardInterrupt."""
    import os

    check = ("import signal, sys; import sa_jobs, sa_jobs.cli;"
             " print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    proc = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.stdout.strip() == "True", proc.stderr


def test_a_worker_whose_server_is_unreachable_says_so_in_one_line(shared_schema):
    """As the operator commands do: the worker's start raised the driver's error inside a
    task group's exception group, which came out as a traceback of the group (exit 1)."""
    proc = subprocess.run(
        [sys.executable, "-m", "sa_jobs", "worker", "tests.jobs_core", "--schema", shared_schema,
         "--database-url", "postgresql://ops:s3cr3t@127.0.0.1:1/db"],
        cwd=REPO_ROOT, env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("sa-jobs: database error: connection failed"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "s3cr3t" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("grace", ["-1", "nan"])
def test_a_negative_or_nan_shutdown_grace_is_refused(capsys, grace):
    """-1 released every job at the first signal, nan waited for them for ever: both were
    taken as given. Parsed only: with the bad value accepted a worker would start here."""
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["worker", "tests.jobs_core", "--shutdown-grace", grace])
    assert exc.value.code == 2 and "must be 0 or more seconds" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["worker", "m", "--shutdown-grace", "0"]).shutdown_grace == 0
    assert cli.build_parser().parse_args(["worker", "m", "--shutdown-grace", "inf"]).shutdown_grace == float("inf")


@pytest.mark.parametrize("option, value", [
    ("--lease", "\uff13\uff10"), ("--lease", "inf"), ("--poll-interval", "nan"), ("--maintenance-interval", "1_0"),
    ("--statement-timeout", "\u0661"), ("--shutdown-grace", "\uff15"),
])
def test_worker_seconds_take_ascii_finite_numbers(capsys, option, value):
    """float() read full-width and Arabic-Indic digits, underscores, 'inf' and 'nan': an
    infinite maintenance tick (the rescuer's) or lease was accepted."""
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["worker", "m", option, value])
    assert exc.value.code == 2 and repr(value) in capsys.readouterr().err
    args = cli.build_parser().parse_args(["worker", "m", option, "2.5e0"])
    assert getattr(args, option[2:].replace("-", "_")) == 2.5


def _change_after_the_count(monkeypatch, database_url, statement, params=()):
    """Run ``statement`` on a connection of its own when the bulk action shows its progress
    first: after it counted (and, before, listed) the matching jobs, before any batch. A
    worker's claim, another operator's replay: what happens to rows during a long run."""

    class Concurrent(cli.Progress):
        def __call__(self, done, total):
            if done == 0:
                q(database_url, statement, params)
            super().__call__(done, total)

    monkeypatch.setattr(cli, "Progress", Concurrent)


CLAIM = ("UPDATE {jobs} SET state = 'running', attempt = attempt + 1, claim_token = gen_random_uuid(),"
         " lease_expires_at = now() + interval '1 hour' WHERE id = %s")


@pytest.mark.parametrize("argv, verb, start, change, expected", [
    # A worker claims a job: cancelling available jobs cancelled the running one.
    (("jobs", "cancel", "--queue", "bulkq", "--state", "available"), "cancelled", "available", CLAIM, "running"),
    # Another operator replays a dead job and a worker completes it: a dead replay re-ran it.
    (("dead", "replay", "--kind", "bulk"), "replayed", "dead",
     "UPDATE {jobs} SET state = 'completed', attempt = attempt + 1, finished_at = now() WHERE id = %s", "completed"),
    # A dead job replayed meanwhile: deleting dead jobs deleted the waiting one.
    (("jobs", "delete", "--state", "dead"), "deleted", "dead",
     "UPDATE {jobs} SET state = 'available', finished_at = NULL WHERE id = %s", "available"),
], ids=["cancel", "replay", "delete"])
def test_a_bulk_action_by_filter_leaves_a_job_that_stopped_matching(
        capsys, monkeypatch, database_url, schema, argv, verb, start, change, expected):
    """The filter is checked again in each batch's transaction, under the rows' locks: the
    ids listed at the start were acted on by id alone, whatever state they had reached."""
    ids = [r[0] for r in q(database_url, jobs_sql(
        schema, "INSERT INTO {jobs} (kind, queue, state, finished_at) SELECT 'bulk', 'bulkq', %s,"
                " CASE WHEN %s = 'dead' THEN now() END FROM generate_series(1, 5) RETURNING id"), (start, start))]
    _change_after_the_count(monkeypatch, database_url, jobs_sql(schema, change), (ids[2],))
    code, out, err = run(capsys, database_url, schema, *argv, "--batch", "2", "--json")
    assert code == 0 and json.loads(out)[verb] == [i for i in ids if i != ids[2]], out + err
    rows = dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs} WHERE kind = 'bulk'")))
    assert rows.get(ids[2]) == expected, rows


@pytest.mark.parametrize("argv, verb, start, change", [
    # A worker completes a job that was waiting when the run began: a retry by kind ran it again.
    (("jobs", "retry", "--kind", "bulk"), "retried", "dead",
     "UPDATE {jobs} SET state = 'completed', finished_at = now(), claim_token = NULL, lease_expires_at = NULL"
     " WHERE id = %(waiting)s"),
    # The app enqueues a job while the run goes on: a cancel by queue cancelled it too (and
    # under a steady stream of enqueues, chased them for as long as it lasted).
    (("jobs", "cancel", "--queue", "bulkq"), "cancelled", "available",
     "INSERT INTO {jobs} (kind, queue, state) SELECT 'bulk', 'bulkq', 'available' WHERE %(waiting)s > 0"),
    # A job a worker completes meanwhile, deleted by a run that began before it was done.
    (("jobs", "delete", "--kind", "bulk", "--state", "completed"), "deleted", "completed",
     "UPDATE {jobs} SET state = 'completed', finished_at = now(), claim_token = NULL, lease_expires_at = NULL"
     " WHERE id = %(waiting)s"),
], ids=["retry", "cancel", "delete"])
def test_a_bulk_action_by_filter_leaves_a_job_that_began_to_match_during_the_run(
        capsys, monkeypatch, database_url, schema, argv, verb, start, change):
    """A filter's matches are its jobs when the run begins (that still match when their
    batch comes), as its count and progress bar say: each batch listed the next matches
    anew, so a job that came to match while the run went on (completed, enqueued) was
    acted on too, and the command did more than the total it announced."""
    ids = [r[0] for r in q(database_url, jobs_sql(
        schema, "INSERT INTO {jobs} (kind, queue, state, finished_at) SELECT 'bulk', 'bulkq', %s,"
                " CASE WHEN %s IN ('dead', 'completed') THEN now() END FROM generate_series(1, 4) RETURNING id"),
        (start, start))]
    # A waiting job among them, that a worker will complete while the run goes on.
    waiting = q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, attempt, claim_token,"
                                                " lease_expires_at) VALUES ('bulk', 'other', 'running', 1,"
                                                " gen_random_uuid(), now() + interval '1 hour') RETURNING id"))[0][0]
    ids += [r[0] for r in q(database_url, jobs_sql(
        schema, "INSERT INTO {jobs} (kind, queue, state, finished_at) SELECT 'bulk', 'bulkq', %s,"
                " CASE WHEN %s IN ('dead', 'completed') THEN now() END FROM generate_series(1, 4) RETURNING id"),
        (start, start))]
    _change_after_the_count(monkeypatch, database_url, jobs_sql(schema, change), {"waiting": waiting})
    code, out, err = run(capsys, database_url, schema, *argv, "--batch", "2", "--json", "--progress")
    assert code == 0 and json.loads(out) == {verb: ids, "not_" + verb: []}, out + err
    assert "8/8 100%" in err, err
    after = dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}")))
    # The job that began to match is as the worker or the app left it.
    late = waiting if "UPDATE" in change else max(after)
    assert after[late] == ("completed" if "UPDATE" in change else "available"), after

def test_an_id_named_with_a_filter_it_does_not_match_is_reported(capsys, database_url, schema, seeded):
    """`jobs delete 7 --kind mail` with job 7 of another kind said nothing and exited 0."""
    available, dead1, dead2, completed, running, dead3 = seeded
    code, out, err = run(capsys, database_url, schema, "jobs", "delete", str(completed), str(dead1), "--kind", "mail",
                         "--json")
    assert code == 1 and json.loads(out) == {"deleted": [dead1], "not_deleted": [completed]}, out + err
    code, out, err = run(capsys, database_url, schema, "jobs", "delete", str(completed), "--kind", "mail")
    assert code == 1 and "0 job(s) deleted" in out and f"job {completed}: not deleted" in err


def test_cancel_by_state_never_cancels_a_job_a_worker_claims_meanwhile(capsys, database_url, schema):
    """A claimer on a connection of its own takes jobs while `jobs cancel --state available`
    runs batch by batch: every cancelled job must be one no claim took (attempt 0)."""
    import threading

    from sa_jobs._url import to_conninfo

    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state) SELECT 'bulk', 'bulkq', 'available'"
                                     " FROM generate_series(1, 3000)"))
    claim = jobs_sql(schema, "UPDATE {jobs} SET state = 'running', attempt = attempt + 1, claim_token = gen_random_uuid(),"
                             " lease_expires_at = now() + interval '1 hour' WHERE id IN (SELECT id FROM {jobs}"
                             " WHERE state = 'available' ORDER BY id LIMIT 5 FOR UPDATE SKIP LOCKED)")
    stop = threading.Event()
    claims = []

    def claimer():
        import psycopg

        with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
            while not stop.is_set():
                claims.append(conn.execute(claim).rowcount)

    thread = threading.Thread(target=claimer)
    thread.start()
    try:
        code, out, err = run(capsys, database_url, schema, "jobs", "cancel", "--state", "available", "--batch", "50",
                             "--json")
    finally:
        stop.set()
        thread.join()
    assert code == 0 and sum(claims) > 0, err
    rows = dict(q(database_url, jobs_sql(schema, "SELECT state, count(*) FILTER (WHERE attempt > 0) FROM {jobs} GROUP BY state")))
    assert rows.get("cancelled", 0) == 0 and rows["running"] == sum(claims), rows
    assert len(json.loads(out)["cancelled"]) == 3000 - sum(claims) > 0  # both sides took jobs


@pytest.mark.parametrize("argv, verb", [
    (("jobs", "delete", "--kind", "bulk"), "deleted"),
    (("jobs", "cancel", "--kind", "bulk"), "cancelled"),
    (("dead", "replay", "--kind", "bulk"), "replayed"),
], ids=["delete", "cancel", "replay"])
def test_a_batch_past_65535_ids_is_one_statement(capsys, database_url, schema, argv, verb):
    """Ids were bound one parameter each: `--batch 100000` failed with 'number of parameters
    must be between 0 and 65535' (PostgreSQL's protocol limit) once that many matched."""
    state = "dead" if verb == "replayed" else "available"
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, finished_at) SELECT 'bulk', %s,"
                                     " CASE WHEN %s = 'dead' THEN now() END FROM generate_series(1, 70000)"), (state, state))
    code, out, err = run(capsys, database_url, schema, *argv, "--batch", "100000")
    assert code == 0 and f"70000 job(s) {verb}" in out, err


def test_the_admin_api_takes_more_than_65535_ids(engine, database_url, schema):
    from sqlalchemy.orm import Session

    from sa_jobs.admin import cancel_many, delete_many, retry_many

    ids = [r[0] for r in q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, finished_at) SELECT 'bulk',"
                                                          " 'dead', now() FROM generate_series(1, 70000) RETURNING id"))]
    with Session(engine) as session, session.begin():
        assert len(retry_many(session, ids)) == 70000
        assert len(cancel_many(session, ids)) == 70000
        assert len(delete_many(session, ids)) == 70000


def test_job_data_cannot_drive_the_operators_terminal(capsys, database_url, schema):
    """Error messages, keys and args are job data (an exception's text can quote user input):
    `jobs list` and `jobs show` wrote their escape sequences raw (clear the screen, set the
    title, reverse the text), and showed non-ASCII args as \\u escapes instead."""
    error = "refused \x1b[2J\x1b]0;pwned\x07 by \u202eevil\ttab"
    job = q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, args, errors, unique_key, finished_at)"
                                           " VALUES ('mail', 'dead', %s::jsonb, %s::jsonb, %s, now()) RETURNING id"),
            (json.dumps({"to": "jürgen@例え.jp", "note": "a\u202eb"}),
             json.dumps([{"attempt": 1, "at": "2026-01-01T00:00:00Z", "error": error + "\nsecond line \x1b[31m"}]),
             "key\x1b[31m"))[0][0]
    for argv in (("jobs", "list"), ("jobs", "show", str(job)), ("queues",)):
        code, out, err = run(capsys, database_url, schema, *argv)
        assert code == 0, err
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\t" not in out, (argv, out)
    code, out, _ = run(capsys, database_url, schema, "jobs", "list")
    assert "refused \\x1b[2J\\x1b]0;pwned\\x07 by \\u202eevil\\ttab" in out
    code, out, _ = run(capsys, database_url, schema, "jobs", "show", str(job))
    assert "jürgen@例え.jp" in out and "key\\x1b[31m" in out and "second line \\x1b[31m" in out
    code, out, _ = run(capsys, database_url, schema, "jobs", "show", str(job), "--json")
    shown = json.loads(out)
    assert shown["errors"][0]["error"] == error + "\nsecond line \x1b[31m" and shown["args"]["note"] == "a\u202eb"


@pytest.mark.parametrize("argv", [("jobs", "list", "--limit", "5000"), ("jobs", "list", "--json", "--limit", "5000")])
def test_output_piped_into_a_reader_that_stops_early_is_not_a_traceback(database_url, schema, argv):
    """`sa-jobs jobs list | head` ended in a BrokenPipeError traceback once head exited."""
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state) SELECT 'bulk', 'available' FROM generate_series(1, 5000)"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sa_jobs", *argv, "--database-url", database_url, "--schema", schema],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline()  # the reader takes a line, then goes away (1 MB is more than a pipe holds)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141 and err == "", err  # as `seq 1000000 | head -1`: 128 + SIGPIPE


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("argv, real", [(("jobs", "list", "--json"), True), (("jobs", "list"), False),
                                        (("queues", "--json"), False)])
def test_output_to_a_full_disk_is_one_line_not_a_traceback(capsys, monkeypatch, database_url, schema, seeded, argv, real):
    """`sa-jobs jobs list --json > out.json` on a full disk ended in an OSError traceback
    (exit 1, the code for "not every id was acted on"). The first case in a real process
    (its flush at exit included); the others in this process, stdout on /dev/full."""
    with open("/dev/full", "w") as full:
        if real:
            proc = subprocess.run([sys.executable, "-m", "sa_jobs", *argv, "--database-url", database_url,
                                   "--schema", schema], cwd=REPO_ROOT, stdout=full, stderr=subprocess.PIPE, text=True,
                                  timeout=60)
            code, err = proc.returncode, proc.stderr
        else:
            with monkeypatch.context() as patched:
                patched.setattr(sys, "stdout", full)
                code, _, err = run(capsys, database_url, schema, *argv)
    assert code == 2 and "Traceback" not in err, err
    assert err == "sa-jobs: cannot write the output: No space left on device\n", err


@pytest.mark.parametrize("argv", [("jobs", "list"), ("queues",), ("prune", "--older-than", "1d"), ("retry", "1")])
def test_no_database_url_is_a_usage_error(capsys, monkeypatch, argv):
    """It exited 1, the code the commands use for 'some ids were not acted on', where every
    other refusal exits 2."""
    monkeypatch.delenv("SA_JOBS_DATABASE_URL", raising=False)
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err == "sa-jobs: no database URL; pass --database-url or set SA_JOBS_DATABASE_URL\n", err


@pytest.mark.parametrize("job_id", ["0", "-5", "99999999999999999999"])
def test_sa_jobs_retry_refuses_an_id_no_job_can_have(capsys, database_url, shared_schema, job_id):
    """As `jobs retry` does (exit 2, usage error); `sa-jobs retry` answered 'not found' (exit 1)."""
    code, _, err = run(capsys, database_url, shared_schema, "retry", job_id)
    assert code == 2 and "job ids are positive integers" in err, err


def test_an_age_of_zero_is_a_filter_too(capsys, database_url, schema, seeded):
    """A zero age was taken for no filter (a zero timedelta is false): `jobs delete 7
    --newer-than 0s` (created within no time: matches nothing) deleted job 7 by id alone."""
    available, dead1, dead2, completed, running, dead3 = seeded
    code, out, err = run(capsys, database_url, schema, "jobs", "delete", str(completed), "--newer-than", "0s", "--json")
    assert code == 1 and json.loads(out) == {"deleted": [], "not_deleted": [completed]}, out + err
    code, out, err = run(capsys, database_url, schema, "jobs", "list", "--newer-than", "0s", "--json")
    assert json.loads(out) == []


def test_an_interrupted_bulk_action_says_what_it_did(capsys, monkeypatch, database_url, schema):
    """Ctrl-C during a long `jobs delete` printed a KeyboardInterrupt traceback and not how
    many jobs its committed batches had deleted. (The interrupt is raised where Python's
    SIGINT handler raises it, between two batches.)"""
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, finished_at) SELECT 'bulk', 'completed', now()"
                                     " FROM generate_series(1, 50)"))

    class CtrlC(cli.Progress):
        def __call__(self, done, total):
            if done == 20:
                raise KeyboardInterrupt
            super().__call__(done, total)

    monkeypatch.setattr(cli, "Progress", CtrlC)
    code, out, err = run(capsys, database_url, schema, "jobs", "delete", "--kind", "bulk", "--batch", "10")
    assert code == 130 and "20 job(s) deleted" in out and "Traceback" not in err, out + err
    assert "interrupted" in err and "run it again" in err
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs}")) == [(30,)]
    code, out, err = run(capsys, database_url, schema, "jobs", "delete", "--kind", "bulk", "--batch", "10", "--json")
    assert code == 130 and len(json.loads(out)["deleted"]) == 20 and json.loads(out)["interrupted"] is True, out + err


def test_an_interrupted_prune_says_what_it_did(capsys, monkeypatch, database_url, schema):
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, finished_at) SELECT 'bulk', 'completed',"
                                     " now() - interval '2 days' FROM generate_series(1, 50)"))

    class CtrlC(cli.Progress):
        def __call__(self, done, total):
            super().__call__(done, total)
            if done == 20:
                raise KeyboardInterrupt

    monkeypatch.setattr(cli, "Progress", CtrlC)
    code, out, err = run(capsys, database_url, schema, "prune", "--older-than", "1d", "--batch", "10")
    assert code == 130 and "Traceback" not in err and "interrupted after 20 job(s) deleted" in err, out + err
    # What each state lost, as an uninterrupted prune says it (and --json, and an interrupted
    # bulk action's "20 job(s) deleted"): stdout said nothing at all.
    assert out == "completed: deleted 20 job(s)\ndead: deleted 0 job(s)\ncancelled: deleted 0 job(s)\n", out
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs}")) == [(30,)]
    # --json prints what it did, as an interrupted bulk action does (it printed nothing).
    code, out, err = run(capsys, database_url, schema, "prune", "--older-than", "1d", "--batch", "10", "--json")
    assert code == 130 and "interrupted after 20 job(s) deleted" in err, out + err
    assert json.loads(out) == {"dry_run": False, "deleted": {"completed": 20, "cancelled": 0, "dead": 0},
                               "interrupted": True}, out


@contextlib.contextmanager
def _ctrl_c_once_waiting(database_url: str, query_like: str) -> Iterator[None]:
    """Inside: this thread gets SIGINT (Ctrl-C) once a session waits for a lock in a
    statement ``LIKE query_like`` (or after 20 s)."""
    import signal
    import threading

    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s"
    main = threading.get_ident()

    def interrupt_once_waiting() -> None:
        deadline = time.monotonic() + 20
        while q(database_url, waiting, (query_like,)) != [(1,)] and time.monotonic() < deadline:
            time.sleep(0.02)
        signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=interrupt_once_waiting)
    thread.start()
    try:
        yield
    finally:
        thread.join(30)


@pytest.mark.parametrize("json_out", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
def test_a_prune_interrupted_while_counting_says_what_it_did(capsys, database_url, schema, dry_run, json_out):
    """Ctrl-C while the prune counts its rows (a long count on a big table, or one waiting
    for a lock). A dry run said "interrupted after 0 job(s) deleted; run it again to go
    on": it deletes nothing, whether it ran or not. A real prune deleted none yet."""
    import psycopg

    from sa_jobs._url import to_conninfo

    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, finished_at) SELECT 'bulk', 'completed',"
                                     " now() - interval '2 days' FROM generate_series(1, 5)"))
    with psycopg.connect(to_conninfo(database_url)) as holder:  # the count waits for this lock
        holder.execute(jobs_sql(schema, "LOCK TABLE {jobs} IN ACCESS EXCLUSIVE MODE"))
        with _ctrl_c_once_waiting(database_url, f'SELECT count(*) FROM "{schema}"."jobs"%'):
            code, out, err = run(capsys, database_url, schema, "prune", "--older-than", "1d",
                                 *(["--dry-run"] if dry_run else []), *(["--json"] if json_out else []))
    if json_out:  # nothing counted in full (dry run), nothing deleted yet (real)
        assert json.loads(out) == ({"dry_run": True, "would_delete": {}, "interrupted": True} if dry_run else
                                   {"dry_run": False, "deleted": {"completed": 0, "cancelled": 0, "dead": 0},
                                    "interrupted": True}), out
        out = ""
    elif not dry_run:  # a real prune says what each state lost: nothing yet
        assert out == "completed: deleted 0 job(s)\ndead: deleted 0 job(s)\ncancelled: deleted 0 job(s)\n", out
        out = ""
    assert code == 130 and out == "" and "Traceback" not in err, out + err
    if dry_run:
        assert err == "sa-jobs: dry run interrupted; nothing was deleted\n", err
    else:
        assert err == "sa-jobs: interrupted after 0 job(s) deleted; run it again to go on\n", err
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs}")) == [(5,)]


@pytest.mark.parametrize("json_out", [False, True], ids=["table", "json"])
def test_a_bulk_action_interrupted_while_listing_its_matches_says_what_it_did(capsys, database_url, schema, json_out):
    """Ctrl-C while a bulk action by filter lists its matches (a long read of a big table,
    or one waiting for a lock): "sa-jobs: interrupted" and, with --json, nothing on stdout
    (no JSON for a script to read), where Ctrl-C a moment later, between batches, printed
    the result and "interrupted after 0 job(s) ...", as the docs promise and prune does."""
    import psycopg

    from sa_jobs._url import to_conninfo

    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state) SELECT 'bulk', 'available'"
                                     " FROM generate_series(1, 5)"))
    with psycopg.connect(to_conninfo(database_url)) as holder:  # the listing waits for this lock
        holder.execute(jobs_sql(schema, "LOCK TABLE {jobs} IN ACCESS EXCLUSIVE MODE"))
        with _ctrl_c_once_waiting(database_url, f"%FROM {schema}.jobs%"):
            code, out, err = run(capsys, database_url, schema, "jobs", "cancel", "--kind", "bulk",
                                 *(["--json"] if json_out else []))
    assert code == 130 and "Traceback" not in err, out + err
    if json_out:
        assert json.loads(out) == {"cancelled": [], "not_cancelled": [], "interrupted": True}, out
    else:
        assert out == "0 job(s) cancelled\n", out
    assert err == "sa-jobs: interrupted after 0 job(s) cancelled; run it again to go on\n", err
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state = 'available'")) == [(5,)]


@pytest.mark.parametrize("argv", [("jobs", "cancel", "--kind", "bulk", "--batch", "2"), ("jobs", "cancel", "{first}")],
                         ids=["by filter", "by id"])
def test_ctrl_c_while_a_bulk_batch_waits_for_a_row_lock_stops_at_once(capsys, database_url, schema, argv):
    """A batch waiting for a row another transaction holds has done nothing yet: Ctrl-C
    stops it at once (its transaction rolls back), not after the lock timeout."""
    import psycopg

    from sa_jobs._url import to_conninfo

    ids = [r[0] for r in q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state) SELECT 'bulk', 'available'"
                                                          " FROM generate_series(1, 4) RETURNING id"))]
    with psycopg.connect(to_conninfo(database_url)) as holder:
        holder.execute(jobs_sql(schema, "SELECT 1 FROM {jobs} WHERE id = %s FOR UPDATE"), (ids[0],))
        with _ctrl_c_once_waiting(database_url, "%FOR UPDATE%"):
            started = time.monotonic()
            code, out, err = run(capsys, database_url, schema, *(a.format(first=ids[0]) for a in argv),
                                 "--json", "--lock-timeout", "20")
    assert code == 130 and time.monotonic() - started < 10 and "Traceback" not in err, out + err
    assert json.loads(out) == {"cancelled": [], "not_cancelled": [], "interrupted": True}
    assert err == "sa-jobs: interrupted after 0 job(s) cancelled; run it again to go on\n", err
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state = 'available'")) == [(4,)]


def test_jobs_show_prints_the_last_errors_traceback(capsys, database_url, schema):
    """The text view showed each error's first line only: the traceback the worker stores
    with it (where it failed) was only in --json, as one escaped string."""
    errors = [{"attempt": i, "at": f"2026-01-0{i}T00:00:00Z", "error": f"ValueError: boom {i}", "worker": "w1",
               "traceback": f"Traceback (most recent call last):\n  File \"app.py\", line {i}, in send\nValueError: boom {i}\n"}
              for i in (1, 2)]
    job = q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, attempt, errors, finished_at)"
                                           " VALUES ('mail', 'dead', 2, %s::jsonb, now()) RETURNING id"),
            (json.dumps(errors),))[0][0]
    code, out, err = run(capsys, database_url, schema, "jobs", "show", str(job))
    assert code == 0, err
    assert "#1 2026-01-01T00:00:00Z: ValueError: boom 1" in out and "#2 2026-01-02T00:00:00Z: ValueError: boom 2" in out
    assert 'File "app.py", line 2, in send' in out and 'line 1, in send' not in out, out


@pytest.mark.parametrize("field", ["queues", "kinds", "states"])
def test_job_filter_refuses_one_string_for_a_list_of_names(engine, database_url, schema, seeded, field):
    """JobFilter(queues="emails") was taken letter by letter (queues e, m, a, i, l, s):
    list_jobs answered [] and a bulk action matched nothing, silently; states="dead"
    failed on 'd'."""
    from sqlalchemy.orm import Session

    from sa_jobs.admin import JobFilter, list_jobs
    from sa_jobs.errors import ConfigurationError

    value = {"queues": "emails", "kinds": "mail", "states": "dead"}[field]
    with pytest.raises(ConfigurationError, match=f"JobFilter.{field} is a sequence of names"):
        JobFilter(**{field: value})
    with Session(engine) as session:
        assert len(list_jobs(session, JobFilter(**{field: [value]}))) == 3


def test_output_to_a_stream_that_cannot_encode_the_text_is_escaped_not_a_traceback(database_url, schema):
    """stdout in a legacy encoding (a file redirect on Windows, cp1252; PYTHONIOENCODING)
    met a non-ASCII error message: a UnicodeEncodeError traceback instead of the table."""
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, errors, finished_at) VALUES ('mail', 'dead',"
                                     " %s::jsonb, now())"), (json.dumps([{"attempt": 1, "error": "SMTPError: отказ"}]),))
    proc = subprocess.run(
        [sys.executable, "-m", "sa_jobs", "jobs", "list", "--database-url", database_url, "--schema", schema],
        cwd=REPO_ROOT, capture_output=True, timeout=60, env={**__import__("os").environ, "PYTHONIOENCODING": "ascii"},
    )
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    assert b"SMTPError: \\u043e\\u0442\\u043a\\u0430\\u0437" in proc.stdout, proc.stdout


def test_cancelling_many_running_jobs_tells_their_workers_in_one_statement(engine, database_url, schema):
    """cancel_many sent one `SELECT pg_notify(...)` per running job: `jobs cancel` of 20,000
    running jobs took 8.9 s where 20,000 waiting ones took 2.2 s, a round trip each (over a
    network, minutes). Every worker still hears of every job."""
    import psycopg
    from psycopg import sql as pg_sql
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from sa_jobs._url import to_conninfo
    from sa_jobs.admin import cancel_many
    from sa_jobs.queries import cancel_channel_name

    ids = [r[0] for r in q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, attempt, claim_token,"
                                                          " lease_expires_at) SELECT 'bulk', 'running', 1,"
                                                          " gen_random_uuid(), now() + interval '1 hour'"
                                                          " FROM generate_series(1, 200) RETURNING id"))]
    statements = []
    listen = event.listens_for(engine, "before_cursor_execute")(lambda *args: statements.append(args[2]))
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as listener:
        listener.execute(pg_sql.SQL("LISTEN {}").format(pg_sql.Identifier(cancel_channel_name(schema))))
        try:
            with Session(engine) as session, session.begin():
                assert set(cancel_many(session, ids)) == set(ids)
        finally:
            event.remove(engine, "before_cursor_execute", listen)
        heard = [n.payload for n in listener.notifies(timeout=1, stop_after=len(ids))]
    assert sorted(map(int, heard)) == sorted(ids)
    assert len(statements) <= 5, len(statements)


def test_the_progress_bar_says_100_percent_only_when_done(capsys):
    """It rounded: 29,910 of 30,000 showed 100% while batches were still to run."""
    progress = cli.Progress("deleted ", enabled=True, width=10)
    progress(29910, 30000)
    assert capsys.readouterr().err.endswith("29910/30000  99%")
    progress(30000, 30000)
    assert capsys.readouterr().err.endswith("30000/30000 100%")


def test_matching_ids_refuses_a_bad_limit_before_any_sql(engine, seeded):
    """``matching_ids(limit=-1)`` reached SQL ("LIMIT must not be negative") and aborted the
    caller's transaction; a bad limit or cursor is now a ConfigurationError, and the
    transaction goes on."""
    from sqlalchemy.orm import Session

    from sa_jobs import ConfigurationError
    from sa_jobs.admin import JobFilter, count_matching, matching_ids

    where = JobFilter(states=["dead"])
    with Session(engine) as session, session.begin():
        for bad in ({"limit": -1}, {"limit": 1.5}, {"limit": True}, {"after": "3"}):
            with pytest.raises(ConfigurationError):
                matching_ids(session, where, **bad)
        with pytest.raises(ConfigurationError):
            count_matching(session, where, limit=-1)
        assert len(matching_ids(session, where)) == 3  # the transaction is still usable (3 dead seeded)
        assert matching_ids(session, where, limit=0) == [] and count_matching(session, where, limit=1) == 1


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    import socket

    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield f"postgresql://ops@127.0.0.1:{server.getsockname()[1]}/db"


@pytest.mark.parametrize("argv, env, query, real", [
    (("queues", "--connect-timeout", "2"), {}, "", False),
    (("queues", "pause", "q", "--connect-timeout", "2"), {}, "", False),
    (("jobs", "cancel", "1"), {"SA_JOBS_CONNECT_TIMEOUT": "2"}, "", True),
    (("prune", "--older-than", "1d"), {}, "?connect_timeout=2", False),
    (("check", "--connect-timeout", "2"), {}, "?connect_timeout=0", False),  # the option wins over the URL's
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_a_server_that_never_answers_fails_the_connect_in_one_line(capsys, monkeypatch, silent_server, shared_schema,
                                                                  argv, env, query, real):
    """`sa-jobs queues` against a host that accepts and never answers (a dead proxy) hung for
    ever: no command had a connect timeout. (A subprocess, or in this process a daemon
    thread waited for with a timeout: a hang must not hang the suite.)"""
    import os
    import threading
    import time

    started = time.monotonic()
    if real:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "sa_jobs", *argv, "--database-url", silent_server + query, "--schema", shared_schema],
                cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
                capture_output=True, text=True, timeout=30,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(argv)} still connecting after 30 s")
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        result: list[tuple] = []
        command = threading.Thread(target=lambda: result.append(run(capsys, silent_server + query, shared_schema, *argv)),
                                   daemon=True)
        command.start()
        command.join(30)
        if command.is_alive():
            pytest.fail(f"{' '.join(argv)} still connecting after 30 s")
        assert result, "the command raised (its traceback is in the thread's output)"
        [(code, out, err)] = result
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert err == "sa-jobs: database error: connection timeout expired\n", err
    assert time.monotonic() - started < 20


def test_the_timeouts_default_to_10_s_connect_and_30_s_lock(monkeypatch):
    """What a 10 s wait in a test would show: the URL every connection of the command uses."""
    from sqlalchemy.engine import make_url

    monkeypatch.delenv("SA_JOBS_CONNECT_TIMEOUT", raising=False)
    monkeypatch.delenv("SA_JOBS_LOCK_TIMEOUT", raising=False)

    def url_of(*argv):
        return make_url(cli._database_url(cli.build_parser().parse_args(argv)))

    url = url_of("queues", "--database-url", "postgresql://u@h/db")
    assert url.query == {"connect_timeout": "10", "options": "-c lock_timeout=30000"}
    # The URL's own settings are kept; an explicit option wins over them.
    url = url_of("jobs", "list", "--database-url", "postgresql://u@h/db?connect_timeout=3&options=-c%20lock_timeout%3D5s")
    assert url.query == {"connect_timeout": "3", "options": "-c lock_timeout=5s"}
    url = url_of("jobs", "list", "--lock-timeout", "1.5", "--database-url", "postgresql://u@h/db?options=-c%20search_path%3Dx")
    assert url.query["options"] == "-c search_path=x -c lock_timeout=1500"
    assert url_of("migrate", "--database-url", "postgresql://u@h/db").query == {"connect_timeout": "10"}  # no lock timeout
    assert url_of("worker", "m", "--database-url", "postgresql://u@h/db").query == {}  # the worker has its own


@pytest.mark.parametrize("argv, state", [
    (("jobs", "cancel", "{id}"), "available"), (("jobs", "retry", "{id}"), "dead"), (("retry", "{id}"), "dead"),
    (("dead", "replay", "--all-kinds"), "dead"), (("jobs", "cancel", "--kind", "mail"), "available"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else v)
def test_a_bulk_command_on_rows_a_long_transaction_holds_gives_up_in_one_line(capsys, database_url, schema, argv, state):
    """`jobs cancel 42` on a row another transaction held (FOR UPDATE) waited for as long as
    that transaction lasted: for ever, for a session left idle in transaction."""
    import threading
    import time

    import psycopg

    from sa_jobs._url import to_conninfo

    job = q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, finished_at) VALUES ('mail', %s,"
                                           " CASE WHEN %s = 'dead' THEN now() END) RETURNING id"), (state, state))[0][0]
    holder = psycopg.connect(to_conninfo(database_url))
    holder.execute(jobs_sql(schema, "SELECT id FROM {jobs} WHERE id = %s FOR UPDATE"), (job,))
    # The deadline: the holder is ended after 30 s, and the command then finishes (exit 0).
    safety = threading.Timer(30, q, (database_url, "SELECT pg_terminate_backend(%s)", (holder.info.backend_pid,)))
    safety.start()
    try:
        started = time.monotonic()
        code, out, err = run(capsys, database_url, schema, *(a.format(id=job) for a in argv), "--lock-timeout", "0.5")
        elapsed = time.monotonic() - started
    finally:
        safety.cancel()
        holder.close()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "lock timeout" in err and "--lock-timeout" in err and elapsed < 20, err
    assert q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"), (job,)) == [(state,)]


@pytest.mark.parametrize("argv", [("jobs", "delete", "--kind", "mail"), ("queues",), ("jobs", "list"),
                                  ("prune", "--older-than", "0s")], ids=" ".join)
def test_a_command_on_a_table_a_long_transaction_locked_gives_up_in_one_line(
        capsys, monkeypatch, database_url, schema, argv):
    """`jobs delete` skips locked rows, but waited for ever on the table's lock (a migration,
    LOCK TABLE, VACUUM FULL left in an open transaction), as every other command did.
    The timeout from the environment this time."""
    import threading

    import psycopg

    from sa_jobs._url import to_conninfo

    monkeypatch.setenv("SA_JOBS_LOCK_TIMEOUT", "0.5")
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, finished_at) VALUES ('mail', 'completed', now())"))
    holder = psycopg.connect(to_conninfo(database_url))
    holder.execute(jobs_sql(schema, "LOCK TABLE {jobs} IN ACCESS EXCLUSIVE MODE"))
    safety = threading.Timer(30, q, (database_url, "SELECT pg_terminate_backend(%s)", (holder.info.backend_pid,)))
    safety.start()
    try:
        code, out, err = run(capsys, database_url, schema, *argv)
    finally:
        safety.cancel()
        holder.close()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and "lock timeout" in err, err
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs}")) == [(1,)]


@pytest.mark.parametrize("argv, env, message", [
    (("queues", "--connect-timeout", "-1"), {}, "invalid connect timeout '-1'"),
    (("queues", "--connect-timeout", "1.5"), {}, "invalid connect timeout '1.5'"),
    (("jobs", "list", "--lock-timeout", "nan"), {}, "invalid lock timeout 'nan'"),
    (("queues",), {"SA_JOBS_CONNECT_TIMEOUT": "soon"}, "$SA_JOBS_CONNECT_TIMEOUT: invalid connect timeout 'soon'"),
    (("queues",), {"SA_JOBS_LOCK_TIMEOUT": "-3"}, "$SA_JOBS_LOCK_TIMEOUT: invalid lock timeout '-3'"),
])
def test_a_bad_timeout_is_refused_with_a_clear_error(capsys, monkeypatch, database_url, shared_schema, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = run(capsys, database_url, shared_schema, *argv)
    assert code == 2 and message in err and "Traceback" not in err and out == "", err


@pytest.mark.parametrize("argv, message", [
    (("jobs", "list", "--older-than", "-5s"), "invalid age '-5s': an age is 0 or more"),
    (("jobs", "delete", "--newer-than", "-1.5h"), "invalid age '-1.5h': an age is 0 or more"),
    (("jobs", "list", "--older-than=-5"), "invalid age '-5': an age is 0 or more"),
    (("prune", "--older-than", "-7d"), "invalid age '-7d': an age is 0 or more"),
    (("queues", "limit", "q", "--rate", "-10/1s"), "invalid rate '-10/1s'"),
])
def test_a_negative_age_is_refused_as_a_bad_age(capsys, database_url, shared_schema, argv, message):
    """`--older-than -5s` got argparse's "expected one argument" (it took -5s for an option),
    where every other bad age is named with what is wrong with it."""
    code, out, err = run(capsys, database_url, shared_schema, *argv)
    assert code == 2 and message in err and "expected one argument" not in err and out == "", err


def test_job_filter_refuses_a_negative_or_non_timedelta_age():
    """Through the API a negative older_than matched every job (created before a moment to
    come), and an int reached SQL as an error that aborted the caller's transaction."""
    import datetime as dt

    from sa_jobs.admin import JobFilter
    from sa_jobs.errors import ConfigurationError

    for field, value in [("older_than", dt.timedelta(seconds=-5)), ("newer_than", dt.timedelta(days=-1)),
                         ("older_than", 60)]:
        with pytest.raises(ConfigurationError, match=field):
            JobFilter(**{field: value})
    assert JobFilter(older_than=dt.timedelta(0)).older_than == dt.timedelta(0)


@pytest.mark.parametrize("value", ["\u0661\u0662\u0663", "\uff11\uff12\uff13", "1_000", "\u00b2"])
@pytest.mark.parametrize("argv", [("jobs", "show", "{v}"), ("jobs", "retry", "{v}"), ("jobs", "cancel", "1", "{v}"),
                                  ("retry", "{v}")], ids=" ".join)
def test_a_job_id_in_other_than_ascii_digits_is_refused(capsys, database_url, shared_schema, argv, value):
    """Python's int() reads Arabic-Indic and full-width digits and underscores: '١٢٣' acted
    on job 123. Ids are ASCII digits only, refused as any other bad id."""
    code, out, err = run(capsys, database_url, shared_schema, *(a.format(v=value) for a in argv))
    assert code == 2 and "invalid job id" in err and "Traceback" not in err and out == "", err


@pytest.mark.parametrize("argv, message", [
    (("jobs", "list", "--limit", "\uff15"), "must be an integer from 1 to 100000"),
    (("jobs", "delete", "--state", "dead", "--batch", "\u0661\u0660"), "must be an integer from 1 to 1000000"),
    (("queues", "limit", "q", "--concurrency", "\u00b2"), "invalid limit"),  # int('²') raised: a traceback
    (("queues", "limit", "q", "--concurrency", "\u0665"), "invalid limit"),
    (("queues", "limit", "q", "--rate", "\u00b2/1s"), "invalid rate"),
    (("jobs", "list", "--older-than", "\u0665d"), "invalid age"),
    (("jobs", "list", "--lock-timeout", "\uff11"), "invalid lock timeout"),
])
def test_other_numbers_in_other_than_ascii_digits_are_refused(capsys, database_url, shared_schema, argv, message):
    code, out, err = run(capsys, database_url, shared_schema, *argv)
    assert code == 2 and message in err and "Traceback" not in err and out == "", err


@pytest.mark.parametrize("argv, message", [
    (("--concurrency", "99999999999"), "invalid limit '99999999999' for --concurrency: use an integer from 1 to"
                                       " 2147483647, or none"),
    (("--partition-concurrency", "0"), "invalid limit '0' for --partition-concurrency: use an integer from 1 to"
                                       " 2147483647, or none"),
    (("--rate", "99999999999/1s"), "invalid rate '99999999999/1s': the count is an integer from 1 to 2147483647"),
    (("--rate", "0/1s"), "invalid rate '0/1s': the count is an integer from 1 to 2147483647"),
    (("--rate", "5/0s"), "invalid rate '5/0s': the period is at least 1 ms"),
    (("--rate", "5/0.0001s"), "invalid rate '5/0.0001s': the period is at least 1 ms"),
])
def test_a_queue_limit_out_of_range_names_the_option_the_value_and_the_range(capsys, database_url, shared_schema,
                                                                               argv, message):
    """`queues limit q --concurrency 99999999999` said "concurrency must be a positive int or
    None, not 99999999999" (it is positive; the bound unsaid, and None is not how --concurrency
    is spelt); `--rate 1/0s` "rate period must be a timedelta of at least 1 ms, not
    datetime.timedelta(0)": the Python API's words, and a Python repr, for an option's value."""
    code, out, err = run(capsys, database_url, shared_schema, "queues", "limit", "q", *argv)
    assert code == 2 and out == "" and message in err, err
    assert "timedelta" not in err and "None" not in err, err


def test_the_admin_api_refuses_ids_in_other_than_ascii_digits(engine, database_url, schema):
    """The API's string ids were already ASCII only (a regex with re.ASCII): kept so."""
    from sqlalchemy.orm import Session

    from sa_jobs.admin import cancel_many, delete_many, retry_many
    from sa_jobs.errors import JobNotFoundError

    with Session(engine) as session:
        for action in (retry_many, cancel_many, delete_many):
            for value in ("\u0661\u0662\u0663", "\uff11\uff12\uff13", "1_000"):
                with pytest.raises(JobNotFoundError, match="job ids are integers"):
                    action(session, [value])


def test_parse_rate_reads_a_period_without_a_leading_digit():
    """'5/.5s' read as 5 per 1.5 s (a '1' was put before any period not starting with a digit)."""
    import datetime as dt

    from sa_jobs.admin import parse_rate

    assert parse_rate("5/.5s") == (5, dt.timedelta(seconds=0.5))
    assert parse_rate("100/m") == (100, dt.timedelta(minutes=1))
    assert parse_rate("10/2h") == (10, dt.timedelta(hours=2))


@pytest.mark.parametrize("rate, shown", [
    ("10/1234.5678s", "10/1234.5678s"), ("10/1234567s", "10/1234567s"), ("3/1.000001s", "3/1.000001s"),
    ("5/.5s", "5/0.5s"), ("7/90s", "7/90s"), ("100/m", "100/1m"), ("9/0.001s", "9/0.001s"),
])
def test_a_rate_is_shown_exactly_and_as_rate_reads_it(capsys, database_url, schema, rate, shown):
    """A period's seconds were written with %g, six significant digits: 10/1234.5678s was
    shown as 10/1234.57s, 3/1.000001s as 3/1s, and 10/1234567s as 10/1.23457e+06s, which
    --rate then refused. `queues limit` and `queues` show what is stored, as --rate takes it."""
    from sa_jobs.admin import format_rate, parse_rate

    code, out, _ = run(capsys, database_url, schema, "queues", "limit", "q", "--rate", rate, "--json")
    assert code == 0 and json.loads(out)["rate"] == shown
    code, out, _ = run(capsys, database_url, schema, "queues", "--json")
    assert [r["rate"] for r in json.loads(out) if r["queue"] == "q"] == [shown]
    assert parse_rate(shown) == parse_rate(rate) and format_rate(parse_rate(shown)) == shown
    code, out, err = run(capsys, database_url, schema, "queues", "limit", "q", "--rate", shown)
    assert code == 0 and f"rate={shown}" in out, err


def test_a_bulk_action_stopped_by_a_lock_timeout_says_what_it_did(capsys, database_url, schema):
    """Batches before the one that timed out committed: the operator is told how many, as
    after Ctrl-C, besides the one-line error."""
    import threading

    import psycopg

    from sa_jobs._url import to_conninfo

    first, second = (r[0] for r in q(database_url, jobs_sql(
        schema, "INSERT INTO {jobs} (kind, state) VALUES ('mail', 'available'), ('mail', 'available') RETURNING id")))
    holder = psycopg.connect(to_conninfo(database_url))
    holder.execute(jobs_sql(schema, "SELECT id FROM {jobs} WHERE id = %s FOR UPDATE"), (second,))
    safety = threading.Timer(30, q, (database_url, "SELECT pg_terminate_backend(%s)", (holder.info.backend_pid,)))
    safety.start()
    try:
        code, out, err = run(capsys, database_url, schema, "jobs", "cancel", str(first), str(second), "--batch", "1",
                             "--lock-timeout", "0.5")
    finally:
        safety.cancel()
        holder.close()
    lines = err.splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 2, err
    assert lines[0] == "sa-jobs: stopped after 1 job(s) cancelled" and "lock timeout" in lines[1], err
    assert dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}"))) == {
        first: "cancelled", second: "available"}


def test_a_bulk_action_or_prune_stopped_by_an_error_prints_its_json_result(capsys, monkeypatch, database_url, schema):
    """With --json, a run whose batches had committed when one failed (a lock timeout, a
    lost connection) printed nothing on stdout: a script could not tell which jobs were
    done, where Ctrl-C at that moment printed them. The result comes with the error's line
    (also on stderr, exit 2 as before)."""
    import threading

    import psycopg

    from sa_jobs._url import to_conninfo

    first, second = (r[0] for r in q(database_url, jobs_sql(
        schema, "INSERT INTO {jobs} (kind, state) VALUES ('mail', 'available'), ('mail', 'available') RETURNING id")))
    holder = psycopg.connect(to_conninfo(database_url))
    holder.execute(jobs_sql(schema, "SELECT id FROM {jobs} WHERE id = %s FOR UPDATE"), (second,))
    safety = threading.Timer(30, q, (database_url, "SELECT pg_terminate_backend(%s)", (holder.info.backend_pid,)))
    safety.start()
    try:
        code, out, err = run(capsys, database_url, schema, "jobs", "cancel", "--kind", "mail", "--batch", "1",
                             "--lock-timeout", "0.5", "--json")
    finally:
        safety.cancel()
        holder.close()
    assert code == 2 and "Traceback" not in err and "lock timeout" in err, out + err
    result = json.loads(out)
    assert result["cancelled"] == [first] and result["not_cancelled"] == [], result
    assert result["error"] == err.splitlines()[-1].removeprefix("sa-jobs: "), (result, err)

    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, finished_at) SELECT 'old', 'completed',"
                                     " now() - interval '30 days' FROM generate_series(1, 5)"))
    kill = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            " AND position(%s in query) > 0")

    class LoseTheConnection(cli.Progress):
        def __call__(self, done, total):
            super().__call__(done, total)
            if done == 4:  # two batches of 2 committed
                q(database_url, kill, (f'"{schema}"."jobs"',))

    monkeypatch.setattr(cli, "Progress", LoseTheConnection)
    code, out, err = run(capsys, database_url, schema, "prune", "--older-than", "7d", "--batch", "2", "--json")
    assert code == 2 and "Traceback" not in err, out + err
    result = json.loads(out)
    assert result["dry_run"] is False and result["deleted"] == {"completed": 4, "cancelled": 0, "dead": 0}, result
    assert result["error"].startswith("database error"), result


@pytest.mark.parametrize("argv", [("jobs", "cancel", "--kind", "bulk"), ("jobs", "cancel", "{a}", "{b}", "{c}")],
                         ids=["by filter", "by id"])
def test_a_bulk_batch_that_deadlocks_with_a_workers_completion_is_tried_again(capsys, database_url, schema, argv):
    """A worker's completer writes a batch of outcomes in one UPDATE, row by row in the
    order its jobs ended; a bulk batch locks its rows in id order. A completion holding a
    later row and waiting for an earlier one the batch holds is a deadlock, which the
    server ends by aborting one of them (here the batch, which waited first): the whole
    command failed with "deadlock detected", exit 2, the batches after it never run. The
    batch rolled back; it is tried again, and acts on the rows as the completion left them."""
    import threading

    import psycopg

    from sa_jobs._url import to_conninfo

    a, b, c = (r[0] for r in q(database_url, jobs_sql(
        schema, "INSERT INTO {jobs} (kind, state, attempt, claim_token, lease_expires_at) SELECT 'bulk', 'running', 1,"
                " gen_random_uuid(), now() + interval '1 hour' FROM generate_series(1, 3) RETURNING id")))
    complete = jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now(), claim_token = NULL,"
                                " lease_expires_at = NULL WHERE id = %s")
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s"
    completer = psycopg.connect(to_conninfo(database_url))
    completer.execute(complete, (b,))  # the later job ended first: its row is locked

    def complete_the_earlier_once_the_batch_waits() -> None:
        deadline = time.monotonic() + 20
        # This schema's (the server is shared with other tests).
        while q(database_url, waiting, (f"%{schema}.jobs%FOR UPDATE%",)) != [(1,)] and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            completer.execute(complete, (a,))  # waits for the batch's lock on a: the cycle
            completer.commit()
        except psycopg.errors.DeadlockDetected:  # the server chose the completion: not this test's case
            completer.rollback()

    thread = threading.Thread(target=complete_the_earlier_once_the_batch_waits)
    thread.start()
    try:
        code, out, err = run(capsys, database_url, schema, *(x.format(a=a, b=b, c=c) for x in argv), "--json")
    finally:
        thread.join(30)
        completer.close()
    assert "deadlock" not in err and code == (0 if "--kind" in argv else 1), out + err
    assert json.loads(out) == {"cancelled": [c], "not_cancelled": [a, b]}, out + err
    assert dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}"))) == {
        a: "completed", b: "completed", c: "cancelled"}


def test_the_workers_numbers_in_other_than_ascii_digits_are_refused(capsys):
    """Parsed only: with the value accepted a worker would start here."""
    from sa_jobs.errors import ConfigurationError

    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["worker", "tests.jobs_core", "--concurrency", "\u0661\u0660"])
    assert exc.value.code == 2 and "must be an integer from 1 to 10000, not" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="the concurrency after '=' must be an integer"):
        cli._parse_queues(["core=\u0665"], 10)
    assert cli._parse_queues(["core=5", "other"], 10) == {"core": 5, "other": 10}


def test_a_workers_concurrency_has_an_upper_bound_named_with_the_option(capsys):
    """`worker M --concurrency 99999999999` (or `--queue core=99999999999`, a slip for a
    milliseconds or a cluster-wide limit) was taken: the worker starts a task a slot, and
    grew to 24 GB until the kernel's OOM killer ended it (and whatever else it chose).
    Parsed only, never run: with the value accepted a worker would start here."""
    from sa_jobs.errors import ConfigurationError

    most = cli.MAX_WORKER_CONCURRENCY
    for value in ("99999999999", str(most + 1)):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(["worker", "tests.jobs_core", "--concurrency", value])
        assert exc.value.code == 2
        assert f"argument --concurrency: must be an integer from 1 to {most}, not '{value}'" in capsys.readouterr().err
        with pytest.raises(ConfigurationError, match=rf"--queue 'core={value}': the concurrency after '=' must be an"
                                                     rf" integer from 1 to {most}"):
            cli._parse_queues([f"core={value}"], 10)
    assert cli.build_parser().parse_args(["worker", "m", "--concurrency", str(most)]).concurrency == most
    assert cli._parse_queues([f"core={most}"], 10) == {"core": most}


@pytest.mark.parametrize("argv, verb", [
    (("jobs", "retry", "--kind", "held"), "retried"),
    (("jobs", "cancel", "--kind", "held"), "cancelled"),
], ids=["retry", "cancel"])
def test_a_bulk_action_by_filter_does_not_wait_for_rows_it_cannot_act_on(capsys, database_url, schema, argv, verb):
    """Each batch re-reads its matches under FOR UPDATE: `jobs retry --kind K` locked the
    kind's running and waiting rows too, which it never retries, and so waited for any
    transaction holding one (a handler's ctx.transaction(), a worker's claim or heartbeat;
    a deadlock with them failed the command). Only rows the action may act on are locked."""
    import threading

    import psycopg

    from sa_jobs._url import to_conninfo

    start = "dead" if verb == "retried" else "available"
    other = "running" if verb == "retried" else "completed"
    target, busy = [r[0] for r in q(database_url, jobs_sql(
        schema, "INSERT INTO {jobs} (kind, state, finished_at, claim_token, lease_expires_at) VALUES"
                " ('held', %s, CASE WHEN %s = 'dead' THEN now() END, NULL, NULL),"
                " ('held', %s, CASE WHEN %s = 'completed' THEN now() END,"
                "  CASE WHEN %s = 'running' THEN gen_random_uuid() END,"
                "  CASE WHEN %s = 'running' THEN now() + interval '1 hour' END) RETURNING id"),
        (start, start, other, other, other, other))]
    done = threading.Event()
    result: list = []

    def command() -> None:
        try:
            result.append(run(capsys, database_url, schema, *argv, "--json"))
        finally:
            done.set()

    with psycopg.connect(to_conninfo(database_url)) as holder:  # a handler's open transaction on its row
        holder.execute(jobs_sql(schema, "SELECT 1 FROM {jobs} WHERE id = %s FOR UPDATE"), (busy,))
        thread = threading.Thread(target=command)
        thread.start()
        finished = done.wait(10)
        holder.rollback()
    thread.join()
    assert finished, f"{argv[0]} {argv[1]} --kind waited for a row it does not act on"
    code, out, err = result[0]
    # The busy row is in a state the action does not act on: not a match, so not reported.
    assert code == 0 and json.loads(out) == {verb: [target], "not_" + verb: []}, out + err


def test_the_operator_queries_from_an_async_session_say_to_use_run_sync(database_url, schema, seeded):
    """list_jobs, show_job, matching_ids, count_matching, delete_many and queue_overview
    given an AsyncSession failed with bare AttributeErrors and TypeErrors on a coroutine
    never awaited (delete_many deleted nothing and said nothing of why), where the other
    admin calls name run_sync. They now do too, before any statement."""
    from sa_jobs.admin import (JobFilter, count_matching, delete_many, list_jobs, matching_ids, queue_overview,
                               show_job)

    from .helpers import refused_in_an_async_session

    calls = {
        "list_jobs": list_jobs, "show_job": lambda s: show_job(s, seeded[0]),
        "matching_ids": lambda s: matching_ids(s, JobFilter(queues=["emails"])),
        "count_matching": lambda s: count_matching(s, JobFilter(queues=["emails"])),
        "delete_many": lambda s: delete_many(s, [seeded[0]]), "queue_overview": queue_overview,
    }

    async def then(session) -> None:
        assert len(await session.run_sync(list_jobs)) == len(seeded)

    refused_in_an_async_session(database_url, schema, calls, then)
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs}")) == [(len(seeded),)]


@pytest.mark.parametrize("argv, verb, start", [
    (("jobs", "cancel", "--queue", "lq"), "cancelled", "available"),
    (("jobs", "retry", "--queue", "lq"), "retried", "dead"),
    (("jobs", "delete", "--queue", "lq"), "deleted", "dead"),
], ids=["cancel", "retry", "delete"])
def test_a_limit_by_filter_counts_the_jobs_the_action_can_act_on(capsys, database_url, schema, argv, verb, start):
    """By filter, the matches were the filter's rows of every state: `jobs cancel --queue lq
    --limit 3` took the queue's three oldest rows, finished (or running) ones, cancelled
    none of its waiting jobs, exit 0; and without --limit every row the action cannot take
    was read batch by batch and reported as not done (a line each for a million completed
    jobs of the queue). A filter's matches are the rows in a state the action acts on."""
    other = "completed" if verb == "cancelled" else "running"
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, finished_at, claim_token, lease_expires_at)"
                                     " SELECT 'k', 'lq', %s, CASE WHEN %s = 'completed' THEN now() END,"
                                     " CASE WHEN %s = 'running' THEN gen_random_uuid() END,"
                                     " CASE WHEN %s = 'running' THEN now() + interval '1 hour' END"
                                     " FROM generate_series(1, 10)"), (other, other, other, other))
    ids = [r[0] for r in q(database_url, jobs_sql(
        schema, "INSERT INTO {jobs} (kind, queue, state, finished_at) SELECT 'k', 'lq', %s,"
                " CASE WHEN %s = 'dead' THEN now() END FROM generate_series(1, 5) RETURNING id"), (start, start))]
    code, out, err = run(capsys, database_url, schema, *argv, "--limit", "3", "--batch", "2", "--json")
    assert code == 0 and json.loads(out) == {verb: ids[:3], "not_" + verb: []}, out + err
    code, out, err = run(capsys, database_url, schema, *argv, "--progress")
    assert code == 0 and out == f"2 job(s) {verb}\n" and "2/2 100%" in err and "not " + verb not in err, out + err


@pytest.mark.parametrize("argv, message", [
    (("jobs", "cancel", "--kind", "k", "--state", "completed"), "--state completed"),
    (("jobs", "retry", "--state", "dead", "--state", "running"), "--state running"),
    (("jobs", "delete", "--queue", "q", "--state", "running"), "--state running"),
])
def test_a_state_the_action_cannot_act_on_is_refused(capsys, database_url, schema, seeded, argv, message):
    """`jobs cancel --state completed` read every completed job and reported each as not
    cancelled, exit 0: no job in that state can be. It is a usage error now, before any SQL."""
    code, out, err = run(capsys, database_url, schema, *argv)
    assert code == 2 and message in err and "Traceback" not in err and out == "", err


def test_a_prune_stopped_by_an_error_says_what_it_did(capsys, monkeypatch, database_url, schema):
    """Each batch of a prune commits on its own: one lost after two batches (its connection
    ended, a lock timeout) printed the error alone, and the operator could not tell that
    jobs had been deleted, nor how many, where a bulk action says so (and Ctrl-C does)."""
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, finished_at) SELECT 'old', 'completed',"
                                     " now() - interval '30 days' FROM generate_series(1, 5)"))
    kill = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            " AND position(%s in query) > 0")

    class LoseTheConnection(cli.Progress):
        def __call__(self, done, total):
            super().__call__(done, total)
            if done == 4:  # two batches of 2 committed
                q(database_url, kill, (f'"{schema}"."jobs"',))

    monkeypatch.setattr(cli, "Progress", LoseTheConnection)
    code, out, err = run(capsys, database_url, schema, "prune", "--older-than", "7d", "--batch", "2")
    lines = err.splitlines()
    assert code == 2 and out == "" and "Traceback" not in err and len(lines) == 2, err
    assert lines[0] == "sa-jobs: stopped after 4 job(s) deleted" and lines[1].startswith("sa-jobs: database error"), err
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs}")) == [(1,)]


def test_a_prune_raced_by_the_leaders_pruner_ends_its_progress_bar_at_100_percent(capsys, monkeypatch, database_url,
                                                                                 schema):
    """The leader's Pruner deleting some of the rows counted (its own batches, SKIP LOCKED
    between the two) left `prune --progress` at "6/10 60%" once it was done: as if it had
    stopped short. Its count stays what it deleted."""
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, finished_at) SELECT 'old', 'completed',"
                                     " now() - interval '30 days' FROM generate_series(1, 10)"))
    _change_after_the_count(monkeypatch, database_url, jobs_sql(
        schema, "DELETE FROM {jobs} WHERE id IN (SELECT id FROM {jobs} ORDER BY id LIMIT 4)"))
    code, out, err = run(capsys, database_url, schema, "prune", "--older-than", "7d", "--batch", "4", "--progress")
    assert code == 0 and out.startswith("completed: deleted 6 job(s)\n"), out + err
    assert err.rstrip("\n").endswith("6/6 100%"), repr(err)


def _run_with_closed(stream: str, database_url, schema, *argv):
    """The CLI as a shell runs it with ``>&-`` (``stream`` "1") or ``2>&-`` ("2")."""
    return subprocess.run(["sh", "-c", f'"$@" {stream}>&-', "sh", sys.executable, "-m", "sa_jobs", *argv,
                           "--database-url", database_url, "--schema", schema],
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)


@pytest.mark.parametrize("argv, real", [(("jobs", "list"), False), (("queues",), False), (("jobs", "list", "--json"), False),
                                        (("migrate", "--sql"), False), (("jobs", "delete", "{completed}"), True)])
def test_a_closed_stdout_is_one_line_and_nothing_done(capsys, monkeypatch, database_url, schema, seeded, argv, real):
    """`sa-jobs jobs list >&-` (stdout closed, so Python's sys.stdout is None) ended in an
    AttributeError traceback ('NoneType' object has no attribute 'flush'), after the
    command had acted: a `jobs delete` deleted and then failed. That one runs as a shell
    starts it; the others in this process, with the sys.stdout None a closed fd 1 gives."""
    completed = seeded[3]
    argv = tuple(a.format(completed=completed) for a in argv)
    if real:
        proc = _run_with_closed("1", database_url, schema, *argv)
        code, err = proc.returncode, proc.stderr
    else:
        with monkeypatch.context() as patched:
            patched.setattr(sys, "stdout", None)
            code, _, err = run(capsys, database_url, schema, *argv)
    assert code == 2 and "Traceback" not in err, err
    assert err == "sa-jobs: stdout is closed, nothing done (redirect it to /dev/null to discard the output)\n", err
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE id = %s"), (completed,)) == [(1,)]


def test_a_worker_runs_with_its_stdout_closed(shared_schema):
    """The worker prints nothing to stdout (its log goes to stderr): a daemon started with
    `>&-` runs; here it gets as far as connecting to a server that is not there."""
    proc = _run_with_closed("1", "postgresql://postgres@127.0.0.1:1/db", shared_schema, "worker", "tests.jobs_core")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("sa-jobs: database error:"), proc.stderr


def test_a_closed_stderr_does_not_send_errors_to_stdout(database_url, schema):
    """With `2>&-` (sys.stderr None) print(..., file=sys.stderr) printed to stdout: the
    error line of `jobs show 999999 --json` came out where a script reads the JSON."""
    proc = _run_with_closed("2", database_url, schema, "jobs", "show", "999999", "--json")
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout


def test_jobs_list_limit_above_the_cap_names_the_option_and_range(capsys, database_url, schema):
    """`jobs list --limit 200000` said "limit must be an int in 1..100000, not 200000": the
    Python API's words, not the option's."""
    code, out, err = run(capsys, database_url, schema, "jobs", "list", "--limit", "200000")
    assert code == 2 and out == "", out
    assert "argument --limit: must be an integer from 1 to 100000, not '200000'" in err, err
    code, _, err = run(capsys, database_url, schema, "jobs", "list", "--limit", "100000")
    assert code == 0, err


def test_a_missing_job_id_exits_1_in_every_command(capsys, database_url, schema):
    """The documented convention: 2 = refused (usage, a malformed id, a database error;
    nothing done), 1 = it ran but a named job was not there. `jobs show 999999` exited 2
    where `jobs retry 999999` and `retry 999999` exit 1."""
    for argv in (("jobs", "show", "999999"), ("jobs", "show", "999999", "--json"), ("jobs", "retry", "999999"),
                 ("jobs", "cancel", "999999"), ("jobs", "delete", "999999"), ("retry", "999999")):
        code, _, err = run(capsys, database_url, schema, *argv)
        assert code == 1 and "999999" in err, (argv, code, err)


def test_queues_table_right_aligns_numeric_columns_with_unset_limits(capsys, database_url, schema, seeded):
    """A limit column mixing a number and '-' (a queue without that limit) was left-aligned,
    where a column of numbers alone is right-aligned: the digits did not line up."""
    code, _, err = run(capsys, database_url, schema, "queues", "limit", "emails", "--concurrency", "12",
                       "--partition-concurrency", "3")
    assert code == 0, err
    code, out, _ = run(capsys, database_url, schema, "queues")
    lines = out.splitlines()
    header = lines[0]
    for column in ("CONCURRENCY", "PARTITION_CONCURRENCY", "DEAD"):
        end = header.index(column) + len(column)  # right-aligned: every cell ends where its header does
        for line in lines[1:]:
            assert line[end - 1] != " " and line[end:end + 1] in ("", " "), (column, out)
    assert cli.format_table([{"n": 5}, {"n": None}], ("n",)).splitlines() == ["N", "5", "-"]
    assert cli.format_table([{"n": None}], ("n",), numeric=("n",)).splitlines() == ["N", "-"]
    assert cli.format_table([{"n": 10}, {"n": None}], ("n",)).splitlines() == [" N", "10", " -"]


def _every_parser(parser, path=("sa-jobs",)):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _every_parser(sub, (*path, name))


def test_every_option_of_every_command_is_documented_with_its_default():
    """`--help` left options without a word (`worker --poll-interval`,
    `--maintenance-interval`), positionals bare (`JOB_ID`, `NAME`), defaults unsaid
    (`--schema`, `--lease`, `--shutdown-grace`, `--metrics-host`) and value names argparse
    made up (`--limit LIMIT`, `--batch BATCH`, `--database-url DATABASE_URL`)."""
    import argparse

    problems = []
    for path, parser in _every_parser(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            name = " ".join(path) + " " + (action.option_strings[-1] if action.option_strings else action.dest)
            if not action.help:
                problems.append(f"{name}: no help")
                continue
            takes_value = action.nargs != 0
            if takes_value and action.option_strings and action.metavar is None and action.choices is None:
                problems.append(f"{name}: metavar made up from its name")
            if (takes_value and action.default not in (None, argparse.SUPPRESS, [], ())
                    and "default" not in action.help):
                problems.append(f"{name}: default {action.default!r} not shown")
    assert problems == []


def test_version():
    from sa_jobs import __version__
    from sa_jobs.schema import LATEST_VERSION

    proc = subprocess.run([sys.executable, "-m", "sa_jobs", "--version"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == f"sa-jobs {__version__} (queue schema version {LATEST_VERSION})\n", proc.stdout


@pytest.mark.parametrize("argv, message", [
    (("jobs", "delete", "--kind", "x", "--limit", "99999999999999999999"),
     "argument --limit: must be an integer from 1 to 9223372036854775807, not '99999999999999999999'"),
    (("jobs", "delete", "--kind", "x", "--batch", "99999999999999999999"),
     "argument --batch: must be an integer from 1 to 1000000, not '99999999999999999999'"),
    (("dead", "replay", "--all-kinds", "--batch", "1000001"), "argument --batch: must be an integer from 1 to 1000000"),
    (("prune", "--older-than", "1d", "--batch", "1000001"), "argument --batch: must be an integer from 1 to 1000000"),
    (("worker", "tests.jobs_core", "--concurrency", "0"), "argument --concurrency: must be an integer from 1 to 10000, not '0'"),
    (("worker", "tests.jobs_core", "--metrics-port", "70000"), "argument --metrics-port: must be an integer from 0 to 65535"),
    (("demo", "--metrics-port", "-1"), "argument --metrics-port: must be an integer from 0 to 65535, not '-1'"),
    (("migrate", "--lock-retries", "-3"), "argument --lock-retries: must be an integer, 0 or more, not '-3'"),
    (("worker", "tests.jobs_core", "--queue", "q=0"), "--queue 'q=0': the concurrency after '=' must be an integer"
                                                      " from 1 to 10000"),
])
def test_an_integer_option_out_of_range_names_the_option_and_range(capsys, monkeypatch, database_url, argv, message):
    """As `jobs list --limit`: a bulk --limit or --batch past a bigint failed in the
    database ('bigint out of range'), prune's --batch past its cap said 'batch must be an
    int in 1..1000000', a worker's --concurrency 0 'concurrency must be a positive int', a
    --metrics-port past 65535 bind()'s words and a port of -1 'Servname not supported'."""
    monkeypatch.setenv("SA_JOBS_DATABASE_URL", database_url)
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and message in err and "database error" not in err, err


@pytest.mark.parametrize("argv, option, most", [
    (("worker", "m"), "--poll-interval", "3600"), (("worker", "m"), "--maintenance-interval", "3600"),
    (("worker", "m"), "--lease", "86400"), (("worker", "m"), "--statement-timeout", "86400"),
    (("worker", "m"), "--shutdown-grace", "86400"), (("queues",), "--connect-timeout", "3600"),
    (("jobs", "list"), "--lock-timeout", "86400"), (("migrate",), "--lock-timeout", "86400"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_seconds_options_have_an_upper_bound_named_with_the_option(capsys, argv, option, most):
    """`worker --poll-interval 1e300` was taken (the worker never polled, nor with
    --maintenance-interval rescued a lease), a --lease or --statement-timeout past the
    Worker's bound was refused in the Python API's words ("lease must be ..."), not the
    option's, and a --connect-timeout of 99999999999 went to libpq. The bound is in --help."""
    for value in ("1e300", str(int(most) + 1), "99999999999"):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args([*argv, option, value])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"argument {option}: " in err and f"at most {most}" in err, err
    args = cli.build_parser().parse_args([*argv, option, most])
    dest = "ddl_lock_timeout" if argv == ("migrate",) else option[2:].replace("-", "_")
    assert getattr(args, dest) == float(most)
    parser = cli.build_parser()
    for name in argv[:2] if argv[0] == "jobs" else argv[:1]:
        parser = next(a for a in parser._actions if a.choices and name in a.choices).choices[name]
    help_text = next(a.help for a in parser._actions if option in a.option_strings)
    assert f"at most {most}" in help_text, help_text


@pytest.mark.parametrize("argv", [("retry", "{dead}", "999999"), ("check",), ("migrate",)], ids=" ".join)
def test_retry_check_and_migrate_print_json_with_json(capsys, database_url, schema, seeded, argv):
    """The docs say every command prints JSON with --json; `retry`, `check` and `migrate`
    had no such option (argparse: unrecognized arguments)."""
    from sa_jobs.schema import LATEST_VERSION

    code, out, err = run(capsys, database_url, schema, *(a.format(dead=seeded[1]) for a in argv), "--json")
    assert "unrecognized" not in err, err
    result = json.loads(out)
    if argv[0] == "retry":  # as `jobs retry --json`
        assert code == 1 and result == {"retried": [seeded[1]], "not_retried": [999999]}, (out, err)
    elif argv[0] == "check":
        assert code == 0 and result == {"schema": schema, "drift": []}, out
    else:
        assert code == 0 and result == {"schema": schema, "version": LATEST_VERSION}, out


def test_migrate_json_does_not_go_with_sql(capsys, database_url, shared_schema):
    """--sql prints the DDL itself: JSON around it, or the DDL under --json, would mislead."""
    code, out, err = run(capsys, database_url, shared_schema, "migrate", "--sql", "--json")
    assert code == 2 and out == "" and "--json does not go with --sql" in err, err


@pytest.mark.parametrize("where", ["database", "user", "query"])
def test_a_url_with_a_percent_encoded_nul_is_refused_not_cut_short(capsys, database_url, shared_schema, where):
    """libpq reads each connection keyword as a C string, up to its first NUL: a ``%00`` in
    the URL's database name (``/mydb%00staging``) connected to ``mydb`` and the command
    acted there, listing (or deleting) another database's jobs without a word. Refused
    with the URL's part named, before connecting."""
    from sqlalchemy.engine import make_url

    from sa_jobs import ConfigurationError, Worker
    from sa_jobs._url import to_conninfo

    url = make_url(database_url)
    if where == "database":
        # By hand: SQLAlchemy 2.0 renders a database name unescaped (2.1 escapes it).
        before, mark, query = url.render_as_string(hide_password=False).partition("?")
        path, _, name = before.rpartition("/")
        bad = f"{path}/{name}%00staging{mark}{query}"
    else:
        bad = {
            "user": url.set(username=f"{url.username}\x00admin"),
            "query": url.update_query_dict({"application_name": "a\x00b"}),
        }[where].render_as_string(hide_password=False)
    assert "%00" in bad
    code, out, err = run(capsys, bad, shared_schema, "jobs", "list")
    if where == "database" and "\x00" not in (make_url(bad).database or ""):
        # SQLAlchemy 2.0 leaves a database name's %00 encoded: no NUL reaches libpq, and the
        # command looks for a database of that literal name, not the one before the NUL.
        assert (code, out) == (2, "") and "does not exist" in err and "%00staging" in err, (code, out, err)
        return
    assert (code, out) == (2, ""), (code, out, err)
    assert "NUL" in err and err.count("\n") == 1, err
    with pytest.raises(ConfigurationError, match="NUL"):
        to_conninfo(bad)
    with pytest.raises(ConfigurationError, match="NUL"):
        Worker(bad, kinds=[], schema=shared_schema)


def test_the_json_of_a_million_ids_is_written_at_once_and_the_same_text():
    """A bulk action's --json result was built with a json.dumps() per id: 2.2 s for a
    million ids after the work was done (a Ctrl-C then lost the whole result). The text is
    json.dumps(indent=2)'s, as for any other value."""
    ids = list(range(1, 1_000_001))
    started = time.monotonic()
    text = cli._dumps({"deleted": ids, "not_deleted": []})
    assert time.monotonic() - started < 1.0
    assert json.loads(text) == {"deleted": ids, "not_deleted": []}
    small = {"deleted": [3, 1], "not_deleted": [], "nested": {"ids": [2], "flags": [True, 1], "n": [1.5, 2]}}
    assert cli._dumps(small) == json.dumps(small, indent=2)


@pytest.mark.parametrize("where", ["password", "user", "database", "query"])
@pytest.mark.parametrize("argv", [("jobs", "list"), ("migrate",), ("check",), ("worker", "tests.jobs_core")],
                         ids=" ".join)
def test_a_url_with_bytes_that_are_not_utf8_is_one_line(capsys, database_url, shared_schema, where, argv):
    """A byte that is not UTF-8 in the URL (a Latin-1 password in a shell or an env file of
    that locale: Python passes it on as a lone surrogate, '\\udcff') failed every command
    with a UnicodeEncodeError traceback, from SQLAlchemy's or psycopg's encoding of the URL.
    Refused in one line naming the URL's part, never its value."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    secret = "s3cr\udcffet"  # built by hand: SQLAlchemy cannot render a surrogate either
    user, password = (f"ops{secret}", url.password) if where == "user" else (url.username, url.password)
    if where == "password":
        password = secret
    auth = user + (f":{password}" if password else "")
    name = f"db{secret}" if where == "database" else url.database
    query = f"?application_name={secret}" if where == "query" else ""
    bad = f"postgresql://{auth}@{url.host}:{url.port or 5432}/{name}{query}"
    assert "\udcff" in bad
    code, out, err = run(capsys, bad, shared_schema, *argv)
    assert (code, out) == (2, ""), (code, out, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert f"the database URL's {where}" in err and "not UTF-8" in err and "s3cr" not in err, err



@pytest.mark.parametrize("host, reason", [("a" * 64, "label too long"), ("a..b", "label empty or too long"),
                                          ("h\udcff", "Invalid character")])
def test_a_metrics_host_that_is_no_host_name_is_one_line(capsys, database_url, shared_schema, host, reason):
    """`worker M --metrics-host` of a label past 63 characters, an empty label (a doubled
    dot) or a byte that is not UTF-8 failed with a UnicodeError traceback from the idna
    codec (exit 1); a host that does not resolve was already one line. Refused before the
    worker starts, as a port in use is; start_metrics_server raises ConfigurationError."""
    from sa_jobs import ConfigurationError
    from sa_jobs.metrics import start_metrics_server

    code, out, err = run(capsys, database_url, shared_schema, "worker", "tests.jobs_core",
                         "--metrics-port", "0", "--metrics-host", host)
    assert (code, out) == (2, "") and "Traceback" not in err, (code, err)
    assert err.startswith("sa-jobs: cannot serve metrics on ") and reason in err and err.count("\n") == 1, err
    with pytest.raises(ConfigurationError, match="cannot serve metrics on"):
        start_metrics_server(0, host)
