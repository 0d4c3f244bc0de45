"""The shop's own models, plus one job kind enqueued in the same transaction."""

from __future__ import annotations

from sqlalchemy import ForeignKey, Index, Integer, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sa_jobs import Job


class Base(DeclarativeBase):
    """The shop's metadata: the only one autogenerate compares."""


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(Text, nullable=False, unique=True)


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (Index("orders_customer_idx", "customer_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), nullable=False)
    total_cents: Mapped[int] = mapped_column(Integer, nullable=False)


class SendWelcome(Job, kind="shop.send_welcome", queue="emails", max_attempts=5):
    """Email a new customer; enqueued with the customer row, so never for a rolled-back one."""


@SendWelcome.handler
async def send_welcome(ctx: object, customer_id: int) -> None:
    print(f"welcome, customer {customer_id}")


def sign_up(session: Session, email: str) -> Customer:
    customer = Customer(email=email)
    session.add(customer)
    session.flush()
    session.add(SendWelcome(customer_id=customer.id))
    return customer
