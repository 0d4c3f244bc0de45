"""sa-jobs schema version 4: queue limits and partition keys (index built CONCURRENTLY).

Revision ID: sa_jobs_0004
Revises: sa_jobs_0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0004"
down_revision = "sa_jobs_0003"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 4


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
