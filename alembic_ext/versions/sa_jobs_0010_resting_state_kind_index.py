"""sa-jobs schema version 10: jobs are indexed by state and kind for resting states only
(scheduled, retryable, cancelled, dead; built CONCURRENTLY) in place of jobs_kind_state_idx,
which indexed every row version (dropped CONCURRENTLY after the new index is built).

Revision ID: sa_jobs_0010
Revises: sa_jobs_0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0010"
down_revision = "sa_jobs_0009"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 10


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
