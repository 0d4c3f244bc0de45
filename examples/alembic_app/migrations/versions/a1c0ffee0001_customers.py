"""customers and orders

Revision ID: a1c0ffee0001
Revises:
Create Date: 2024-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "a1c0ffee0001"
down_revision = None
branch_labels = ("shop",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("email", sa.Text(), nullable=False),
        sa.UniqueConstraint("email", name="customers_email_key"),
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("customer_id", sa.Integer(), sa.ForeignKey("customers.id", name="orders_customer_id_fkey"), nullable=False),
        sa.Column("total_cents", sa.Integer(), nullable=False),
    )
    op.create_index("orders_customer_idx", "orders", ["customer_id"])


def downgrade() -> None:
    op.drop_index("orders_customer_idx", table_name="orders")
    op.drop_table("orders")
    op.drop_table("customers")
