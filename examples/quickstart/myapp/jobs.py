"""Job kinds and their handlers: `sa-jobs worker myapp.jobs` imports this module."""

from __future__ import annotations

from sa_jobs import Job, JobContext

from .models import Order


class SendReceipt(Job, kind="myapp.send_receipt", queue="emails", max_attempts=5, timeout=30):
    """Email the receipt of an order (here: mark it sent, exactly once)."""


@SendReceipt.handler
async def send_receipt(ctx: JobContext, order_id: int) -> dict:
    # The order update and the job's completion commit together, fenced by the claim.
    async with ctx.async_transaction(result={"order_id": order_id}) as session:
        order = await session.get(Order, order_id)
        if order is None:
            raise LookupError(f"order {order_id} does not exist")
        order.receipt_sent = True
    return {"order_id": order_id}
