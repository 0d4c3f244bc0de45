"""URL forms that need a server on TCP: the reliability cluster listens on loopback, where
CI's default (embedded) server has a Unix socket only."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from sa_jobs._url import sqlalchemy_url, to_conninfo

from ..helpers import jobs_sql, q, run_worker_until
from ..test_worker import WQuick


@pytest.mark.parametrize("form", ["repeated", "single"])
def test_a_url_with_sqlalchemys_host_port_query_form_runs_the_worker(rel_url, rel_schema, form):
    """SQLAlchemy's multi-host form, ``?host=h1:p1&host=h2:p2`` (or one ``?host=h:p``), reaches
    the database through the app's engine, but to_conninfo handed "h:p" to libpq as a host
    name ("failed to resolve host"): the worker, install and check could not connect."""
    base = make_url(rel_url)
    assert base.host is not None
    live = f"{base.host}:{base.port or 5432}"
    hosts = ("127.0.0.1:1", live) if form == "repeated" else live  # port 1: refused, libpq tries the next
    url = base.set(host=None, port=None, query={**base.query, "host": hosts}).render_as_string(hide_password=False)
    engine = create_engine(sqlalchemy_url(url)).execution_options(schema_translate_map={"sa_jobs": rel_schema})
    try:
        with engine.connect() as conn:  # as the app's engine does
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
        with psycopg.connect(to_conninfo(url), connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with Session(engine) as session, session.begin():
            job = WQuick()
            session.add(job)
            session.flush()
            job_id = job.id
        state = lambda: q(rel_url, jobs_sql(rel_schema, "SELECT state FROM {jobs} WHERE id = %s"), (job_id,))[0][0]
        run_worker_until(url, rel_schema, [WQuick], lambda: state() == "completed", timeout=15)
        assert state() == "completed"
    finally:
        engine.dispose()
