"""Quickstart: enqueue in the business transaction, then run a worker inside this app.

    SA_JOBS_DATABASE_URL=postgresql://... python examples/quickstart/app.py

(Without the variable it starts an embedded PostgreSQL.) The same jobs also run with
`sa-jobs worker myapp.jobs` from this folder.
"""

from __future__ import annotations

import asyncio
import os
import sys

from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from myapp.jobs import SendReceipt  # noqa: E402
from myapp.models import Base, Order  # noqa: E402

import sa_jobs  # noqa: E402
from sa_jobs import embedded  # noqa: E402


def main() -> int:
    url = os.environ.get("SA_JOBS_DATABASE_URL") or embedded.start(cleanup="delete")
    sa_jobs.install(url)  # idempotent; apps with Alembic use alembic_ext instead
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"))  # psycopg 3, as sa-jobs
    Base.metadata.create_all(engine)

    # The user story: the order and its receipt job commit together, or neither does.
    with Session(engine) as session, session.begin():
        order = Order(total=42)
        session.add(order)
        session.flush()
        session.add(SendReceipt(order_id=order.id))
        order_id = order.id

    async def run_worker_until_sent() -> None:
        # Embedded in an asyncio app, as in a FastAPI lifespan.
        async with sa_jobs.Worker(url, kinds=[SendReceipt], queues={"emails": 5}):
            for _ in range(200):
                with Session(engine) as session:
                    if session.get(Order, order_id).receipt_sent:
                        return
                await asyncio.sleep(0.05)
            raise TimeoutError("the receipt job did not run")

    asyncio.run(run_worker_until_sent())
    with Session(engine) as session:
        job = session.scalars(select(SendReceipt).where(SendReceipt.args["order_id"].as_integer() == order_id)).one()
        print(f"order {order_id}: receipt_sent=True; job {job.id} {job.state} on attempt {job.attempt}, result {job.result}")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
