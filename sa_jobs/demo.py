"""``sa-jobs demo``: the whole path on one screen, on an embedded PostgreSQL by default.

It creates a business table, enqueues jobs in the same transaction as business rows
(and shows a rolled-back transaction leaves no job), runs a worker with metrics served,
and prints what happened: one job fails twice then succeeds, one ends dead, and is then
replayed from the dead state.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Optional

import anyio
from sqlalchemy import Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from . import schema as schema_mod
from .admin import retry
from .model import Job, job_table
from .retry import constant_backoff
from .worker import JobContext, Worker
from ._url import display_url, sqlalchemy_url


class _DemoBase(DeclarativeBase):
    pass


class Order(_DemoBase):
    __tablename__ = "sa_jobs_demo_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))
    receipt_sent: Mapped[bool] = mapped_column(default=False)


class SendReceipt(Job, kind="demo.send_receipt", queue="demo", max_attempts=5, backoff=constant_backoff(0.2)):
    """Marks the order's receipt as sent, in the job's own transaction (exactly once)."""


class FlakyWebhook(Job, kind="demo.flaky_webhook", queue="demo", max_attempts=5, backoff=constant_backoff(0.2)):
    """Fails on its first two attempts, then succeeds."""


class DoomedExport(Job, kind="demo.doomed_export", queue="demo", max_attempts=2, backoff=constant_backoff(0.2)):
    """Always fails: ends dead with every attempt's error recorded, then is replayed."""


_replayed_ok: set[int] = set()


@SendReceipt.handler
async def send_receipt(ctx: JobContext, order_id: int) -> None:
    async with ctx.async_transaction(result={"order_id": order_id, "sent": True}) as session:
        order = await session.get(Order, order_id)
        assert order is not None
        order.receipt_sent = True


@FlakyWebhook.handler
def flaky_webhook(ctx: JobContext, url: str) -> dict[str, object]:
    if ctx.attempt < 3:
        raise ConnectionError(f"{url} answered 503 (attempt {ctx.attempt})")
    return {"delivered_on_attempt": ctx.attempt}


@DoomedExport.handler
async def doomed_export(ctx: JobContext, report: str) -> str:
    if ctx.id in _replayed_ok:
        return "exported after replay"
    raise ValueError(f"report {report!r} has a malformed column")


def run_demo(database_url: Optional[str], *, metrics_port: int = 0, timeout: float = 60.0) -> int:
    if database_url is None:
        from . import embedded

        print("No SA_JOBS_DATABASE_URL given: starting an embedded PostgreSQL...")
        database_url = embedded.start(cleanup="delete")
    print(f"Database: {display_url(database_url)}")  # the terminal and CI logs see no password
    print(f"Schema version {schema_mod.install(database_url)} installed (sa-jobs migrate does the same).")
    engine = create_engine(sqlalchemy_url(database_url))
    _DemoBase.metadata.drop_all(engine)
    _DemoBase.metadata.create_all(engine)
    with Session(engine) as session:
        session.execute(job_table().delete().where(Job.kind.like("demo.%")))
        session.commit()

    # 1. Enqueue in the business transaction: both rows commit together.
    with Session(engine) as session, session.begin():
        order = Order(customer="Ada")
        session.add(order)
        session.flush()
        session.add(SendReceipt(order_id=order.id))
        session.add_all([FlakyWebhook(url="https://example.invalid/hook"), DoomedExport(report="q3")])
    # 2. A rolled-back transaction leaves neither the order nor its job.
    with Session(engine) as session:
        with session.begin():
            session.add(Order(customer="Rolled Back"))
            session.add(SendReceipt(order_id=-1))
            session.flush()
            session.rollback()
    with Session(engine) as session:
        queued = session.scalars(select(Job).where(Job.kind.like("demo.%"))).all()
        print(f"Enqueued {len(queued)} jobs with the order; the rolled-back transaction left none.")

    from . import metrics

    server = metrics.start_metrics_server(metrics_port, database_url=database_url)
    print(f"Metrics: {server.url}")
    ok = anyio.run(_work, database_url, engine, server.observer, timeout)
    try:
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
        shown = [l for l in body.splitlines() if l.startswith("sa_jobs_jobs_finished_total")]
        print("Scraped from the metrics endpoint:")
        for line in shown:
            print("  " + line)
    finally:
        server.close()

    with Session(engine) as session:
        print(f"{'id':>4} {'kind':<22} {'state':<10} {'attempt':>7}  errors / result")
        for job in session.scalars(select(Job).where(Job.kind.like("demo.%")).order_by(Job.id)):
            detail = [e["error"] for e in job.errors] if job.errors else job.result
            print(f"{job.id:>4} {job.kind:<22} {job.state:<10} {job.attempt:>4}/{job.max_attempts:<2}  {detail}")
        receipt_sent = session.scalar(select(Order.receipt_sent).where(Order.customer == "Ada"))
        print(f"Order receipt_sent={receipt_sent} (written in the job's own transaction).")
    engine.dispose()
    print("Demo finished: OK" if ok else "Demo finished: UNEXPECTED STATES")
    return 0 if ok else 1


async def _work(database_url: str, engine, observer, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    def states() -> dict[str, tuple[str, int, int]]:
        with Session(engine) as session:
            rows = session.execute(select(Job.kind, Job.state, Job.attempt, Job.id).where(Job.kind.like("demo.%")))
            return {kind: (state, attempt, job_id) for kind, state, attempt, job_id in rows}

    async with Worker(
        database_url, kinds=[SendReceipt, FlakyWebhook, DoomedExport], queues={"demo": 5},
        lease=10, maintenance_interval=0.2, observer=observer,
    ):
        deadline = time.monotonic() + timeout
        replayed = False
        while time.monotonic() < deadline:
            current = await anyio.to_thread.run_sync(states)
            finished = {k: v for k, v in current.items() if v[0] in ("completed", "dead")}
            if not replayed and current.get("demo.doomed_export", ("",))[0] == "dead" and len(finished) == 3:
                job_id = current["demo.doomed_export"][2]
                print(f"DoomedExport {job_id} is dead after 2 attempts; replaying it with `retry()`...")
                _replayed_ok.add(job_id)
                with Session(engine) as session, session.begin():
                    retry(session, job_id)
                replayed = True
                await anyio.sleep(0.1)
                continue
            if replayed and all(v[0] == "completed" for v in current.values()):
                return True
            await anyio.sleep(0.1)
    return False
