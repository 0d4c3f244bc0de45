"""sa-jobs schema version 5: the limited claim function plans its statements for the table as it is.

Revision ID: sa_jobs_0005
Revises: sa_jobs_0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0005"
down_revision = "sa_jobs_0004"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 5


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
