"""sa-jobs schema version 8: one index of running jobs by queue, partition key and lease
(built CONCURRENTLY) in place of jobs_lease_idx and jobs_running_partition_idx (dropped
CONCURRENTLY after it is built).

Revision ID: sa_jobs_0008
Revises: sa_jobs_0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0008"
down_revision = "sa_jobs_0007"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 8


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
