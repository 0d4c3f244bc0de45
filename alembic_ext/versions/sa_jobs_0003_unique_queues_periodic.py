"""sa-jobs schema version 3: unique jobs (index built CONCURRENTLY), queues and periodic tables.

Revision ID: sa_jobs_0003
Revises: sa_jobs_0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0003"
down_revision = "sa_jobs_0002"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 3


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
