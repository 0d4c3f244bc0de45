"""sa-jobs schema version 7: the partitioned claims lock only the jobs they pick (skip scan)
or a window near their room (head).

Revision ID: sa_jobs_0007
Revises: sa_jobs_0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0007"
down_revision = "sa_jobs_0006"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 7


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
