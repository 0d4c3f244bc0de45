"""sa-jobs schema version 9: each statement of the limited claim function reads a queue's
running jobs once when the queue has both a concurrency and a partition limit (up to
version 8: twice).

Revision ID: sa_jobs_0009
Revises: sa_jobs_0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0009"
down_revision = "sa_jobs_0008"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 9


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
