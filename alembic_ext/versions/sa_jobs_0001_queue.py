"""sa-jobs schema version 1: jobs table, claim/due/lease indexes, insert NOTIFY trigger.

Revision ID: sa_jobs_0001
Revises:
Create Date: 2024-06-01
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0001"
down_revision = None
branch_labels = ("sa_jobs",)
depends_on = None

SA_JOBS_VERSION = 1


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
