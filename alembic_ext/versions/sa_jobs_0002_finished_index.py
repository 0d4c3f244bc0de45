"""sa-jobs schema version 2: jobs.progress column, finished-jobs index (built CONCURRENTLY).

Revision ID: sa_jobs_0002
Revises: sa_jobs_0001
Create Date: 2024-07-01
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0002"
down_revision = "sa_jobs_0001"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 2


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
