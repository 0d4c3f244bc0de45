"""A kind that subclasses another kind inherits its class options and its handler.

``class SendWelcome(SendEmail, kind="send_welcome")`` once started from the keyword
defaults: its jobs went to the "default" queue (the "emails" workers never ran them) and
lost the parent's uniqueness, retry policy, timeout, tags and partitioning.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from sqlalchemy import select
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.orm import Session

from sa_jobs import ConfigurationError, Job, JobContext, Unique, constant_backoff, enqueue_many
from sa_jobs.model import KindOptions
from sa_jobs.testing import drain, perform

from .helpers import jobs_sql, q

_backoff = constant_backoff(0.01)


class InhEmail(Job, kind="inh_email", queue="inh_emails", priority=3, max_attempts=5, timeout=7.5,
               backoff=_backoff, tags=("mail",), max_args_bytes=4096,
               unique=Unique(by=("to",)), partition_by=("customer",)):
    pass


class InhWelcome(InhEmail, kind="inh_welcome"):
    """Declares nothing: every option is InhEmail's."""


class InhDigest(InhEmail, kind="inh_digest", queue="inh_digests", priority=-1, max_attempts=2,
                timeout=None, tags=("digest", "weekly"), unique=None, partition_by=()):
    """Overrides each option it names, ``None`` and ``()`` included: no timeout, not unique,
    not partitioned."""


class InhDigestAgain(InhDigest, kind="inh_digest_again", priority=4):
    """A grandchild: its parent's overrides, and InhEmail's options InhDigest kept."""


class InhPlain(Job, kind="inh_plain"):
    pass


class InhPlainChild(InhPlain, kind="inh_plain_child", queue="inh_other"):
    pass


# Handlers: InhEmail's is registered after its children are declared (the usual order in
# a module), and InhWelcome runs it; InhDigest has its own.
@InhEmail.handler
def send_email(ctx: JobContext, to: str, customer: int, **_: object) -> dict[str, object]:
    return {"handler": "send_email", "kind": ctx.kind, "queue": ctx.queue, "to": to}


@InhDigest.handler
def send_digest(ctx: JobContext, to: str, **_: object) -> dict[str, object]:
    return {"handler": "send_digest", "kind": ctx.kind, "queue": ctx.queue, "to": to}


def test_a_child_kind_inherits_every_option_of_its_parent() -> None:
    assert InhWelcome.kind_options() == dataclasses.replace(InhEmail.kind_options(), kind="inh_welcome")


def test_keywords_override_each_option_they_name_and_none_removes_it() -> None:
    digest = InhDigest.kind_options()
    assert (digest.queue, digest.priority, digest.max_attempts, digest.timeout, digest.tags,
            digest.unique, digest.partition_by) == ("inh_digests", -1, 2, None, ("digest", "weekly"), None, ())
    # What InhDigest does not name is still InhEmail's.
    assert digest.backoff is _backoff and digest.max_args_bytes == 4096
    again = InhDigestAgain.kind_options()
    assert again == dataclasses.replace(digest, kind="inh_digest_again", priority=4)


def test_direct_subclasses_of_job_keep_the_keyword_defaults() -> None:
    assert InhPlain.kind_options() == KindOptions(kind="inh_plain")
    assert InhPlainChild.kind_options() == KindOptions(kind="inh_plain_child", queue="inh_other")


class InhNamedParent(Job, kind="inh_named_parent", queue="inh_named", max_attempts=3):
    pass


class InhNamedByItsClass(InhNamedParent):
    pass


def test_a_child_without_a_kind_name_takes_its_class_name() -> None:
    """As docs/core.md says: a child's kind name defaults to its class name, as any kind's
    does, and it inherits the rest."""
    assert InhNamedByItsClass.kind_options() == dataclasses.replace(InhNamedParent.kind_options(), kind="InhNamedByItsClass")


def test_an_overriding_keyword_is_validated() -> None:
    with pytest.raises(ConfigurationError):
        class InhBadPriority(InhEmail, kind="inh_bad_priority", priority=99999):
            pass
    with pytest.raises(ConfigurationError):
        class InhBadTags(InhEmail, kind="inh_bad_tags", tags="mail"):
            pass


def test_a_child_kinds_rows_carry_the_parents_defaults(engine, database_url, schema) -> None:
    with Session(engine) as session, session.begin():
        session.add_all([InhWelcome(to="a@x", customer=7), InhDigest(to="b@x", customer=8)])
    rows = q(database_url, jobs_sql(schema, "SELECT kind, queue, priority, max_attempts, tags, partition_key,"
                                            " unique_key IS NOT NULL FROM {jobs} ORDER BY id"))
    assert rows == [
        ("inh_welcome", "inh_emails", 3, 5, ["mail"], "7", True),
        ("inh_digest", "inh_digests", -1, 2, ["digest", "weekly"], None, False),
    ]


def test_a_child_of_a_unique_kind_is_unique_on_its_own_key(engine, database_url, schema) -> None:
    with Session(engine) as session, session.begin():
        first = InhWelcome(to="a@x", customer=1)
        session.add(first)
        session.flush()
        second = InhWelcome(to="a@x", customer=2)
        session.add(second)
        session.flush()
        assert second.was_duplicate and second.id == first.id
        # The key holds the kind: the parent's job of the same args is another job.
        parent = InhEmail(to="a@x", customer=1)
        session.add(parent)
        session.flush()
        assert not parent.was_duplicate and parent.id != first.id
    with Session(engine) as session, session.begin():
        again = InhWelcome(to="a@x", customer=3)
        session.add(again)
        session.flush()
        assert again.was_duplicate
    rows = q(database_url, jobs_sql(schema, "SELECT kind, args->>'to' FROM {jobs} ORDER BY id"))
    assert rows == [("inh_welcome", "a@x"), ("inh_email", "a@x")]


def test_enqueue_many_of_a_child_kind_uses_its_inherited_options(engine, database_url, schema) -> None:
    with Session(engine) as session, session.begin():
        # Unique (InhWelcome): the second row of "a@x" is a duplicate; COPY (InhDigestAgain).
        enqueue_many(session, InhWelcome, [{"to": "a@x", "customer": 1}, {"to": "a@x", "customer": 2}])
        enqueue_many(session, InhDigestAgain, [{"to": "a@x", "customer": 1}])
    rows = q(database_url, jobs_sql(schema, "SELECT kind, queue, priority, max_attempts, tags, partition_key,"
                                            " unique_key IS NOT NULL FROM {jobs} ORDER BY id"))
    assert rows == [
        ("inh_welcome", "inh_emails", 3, 5, ["mail"], "1", True),
        ("inh_digest_again", "inh_digests", 4, 2, ["digest", "weekly"], None, False),
    ]


def test_the_args_cap_is_inherited() -> None:
    with pytest.raises(Exception, match="4096"):
        InhWelcome(to="a@x", customer=1, body="x" * 5000)


def test_a_child_without_a_handler_runs_its_parents_and_its_own_overrides_it() -> None:
    assert InhWelcome.__sa_jobs_handler__ is send_email
    assert perform(InhWelcome(to="a@x", customer=1)) == {
        "handler": "send_email", "kind": "inh_welcome", "queue": "inh_emails", "to": "a@x"}
    assert perform(InhDigestAgain(to="c@x", customer=1)) == {
        "handler": "send_digest", "kind": "inh_digest_again", "queue": "inh_digests", "to": "c@x"}
    # Registering on the child did not change the parent's handler.
    assert InhEmail.__sa_jobs_handler__ is send_email
    with pytest.raises(ConfigurationError, match="no handler"):
        perform(InhPlainChild())


def test_a_worker_runs_a_child_kind_with_the_inherited_handler(engine, database_url, schema) -> None:
    with Session(engine) as session, session.begin():
        session.add_all([InhWelcome(to="w@x", customer=1), InhDigestAgain(to="d@x", customer=2)])
    assert drain(engine, kinds=[InhWelcome, InhDigestAgain]) == {"completed": 2}
    rows = q(database_url, jobs_sql(schema, "SELECT kind, state, result->>'handler', queue FROM {jobs} ORDER BY id"))
    assert rows == [("inh_welcome", "completed", "send_email", "inh_emails"),
                    ("inh_digest_again", "completed", "send_digest", "inh_digests")]


def test_select_of_the_parent_kind_includes_its_childrens_rows(engine) -> None:
    with Session(engine) as session, session.begin():
        session.add_all([InhEmail(to="p@x", customer=1), InhWelcome(to="c@x", customer=1)])
    with Session(engine) as session:
        assert sorted(j.kind for j in session.scalars(select(InhEmail))) == ["inh_email", "inh_welcome"]
        assert [j.kind for j in session.scalars(select(InhWelcome))] == ["inh_welcome"]


def test_a_delay_keeps_working_for_a_child(engine, database_url, schema) -> None:
    with Session(engine) as session, session.begin():
        session.add(InhWelcome(to="s@x", customer=1).options(delay=dt.timedelta(hours=1)))
    assert q(database_url, jobs_sql(schema, "SELECT state, queue FROM {jobs}")) == [("scheduled", "inh_emails")]


def test_a_worker_for_a_parent_kind_runs_its_subkinds_too(engine, database_url, schema) -> None:
    """``Worker(kinds=[InhEmail])`` ran InhEmail alone: it served InhEmail's queue, claimed
    the InhWelcome jobs there (a child takes its parent's queue) and failed each attempt with
    UnknownKindError, though it held their handler. A kind stands for its subkinds, as
    ``select(InhEmail)`` does. (docs/core.md, "A kind that subclasses a kind")"""
    from sa_jobs import Worker

    worker = Worker(database_url, kinds=[InhEmail], schema=schema)
    assert sorted(worker._kinds) == ["inh_digest", "inh_digest_again", "inh_email", "inh_welcome"]
    assert sorted(Worker(database_url, kinds=[InhDigest], schema=schema)._kinds) == ["inh_digest", "inh_digest_again"]
    with Session(engine) as session, session.begin():
        session.add_all([InhEmail(to="p@x", customer=1), InhWelcome(to="w@x", customer=2)])
    assert drain(engine, kinds=[InhEmail], queues=["inh_emails"]) == {"completed": 2}
    rows = q(database_url, jobs_sql(schema, "SELECT kind, state, result->>'handler' FROM {jobs} ORDER BY id"))
    assert rows == [("inh_email", "completed", "send_email"), ("inh_welcome", "completed", "send_email")]


class InhAbstractMail(Job, queue="inh_abstract", max_attempts=4):
    """A base of kinds, marked abstract as SQLAlchemy marks one: options and a handler to
    share, no kind of its own."""

    __mapper_args__ = {"polymorphic_abstract": True}


class InhAbstractReceipt(InhAbstractMail, kind="inh_abstract_receipt"):
    pass


class InhAbstractInvoice(InhAbstractMail, kind="inh_abstract_invoice"):
    pass


@InhAbstractMail.handler
def send_abstract(ctx: JobContext, to: str) -> str:
    return ctx.kind


def test_an_abstract_base_of_kinds_is_no_kind(engine, database_url, schema) -> None:
    """The class keywords gave it an identity anyway: ``InhAbstractMail(to=...)`` was
    written as a job of kind "InhAbstractMail", which ``select(InhAbstractMail)`` did not
    show (SQLAlchemy leaves an abstract class's identity out) while a worker ran it, and
    ``registered_kinds()`` listed it."""
    from sa_jobs import Worker, registered_kinds

    assert "InhAbstractMail" not in registered_kinds()
    assert InhAbstractReceipt.kind_options().queue == "inh_abstract"
    assert InhAbstractReceipt.kind_options().max_attempts == 4
    with pytest.raises(InvalidRequestError, match="polymorphic_abstract"):  # SQLAlchemy's, before __init__
        InhAbstractMail(to="a@x")
    with Session(engine) as session, session.begin():
        with pytest.raises(ConfigurationError, match="abstract"):
            enqueue_many(session, InhAbstractMail, [{"to": "a@x"}])
        session.add_all([InhAbstractReceipt(to="r@x"), InhAbstractInvoice(to="i@x")])
    with Session(engine) as session:
        assert sorted(j.kind for j in session.scalars(select(InhAbstractMail))) == [
            "inh_abstract_invoice", "inh_abstract_receipt"]
    worker = Worker(database_url, kinds=[InhAbstractMail], schema=schema)
    assert sorted(worker._kinds) == ["inh_abstract_invoice", "inh_abstract_receipt"]
    assert drain(engine, kinds=[InhAbstractMail]) == {"completed": 2}
    rows = q(database_url, jobs_sql(schema, "SELECT kind, state, result, max_attempts FROM {jobs} ORDER BY id"))
    assert rows == [("inh_abstract_receipt", "completed", "inh_abstract_receipt", 4),
                    ("inh_abstract_invoice", "completed", "inh_abstract_invoice", 4)]
