"""sa-jobs schema version 6: the partitioned claims lock jobs as they read them, and the
limited claim function keeps one plan per session.

Revision ID: sa_jobs_0006
Revises: sa_jobs_0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0006"
down_revision = "sa_jobs_0005"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 6


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
