"""sa-jobs schema version 13: finished jobs are indexed by state and finish time
(jobs_state_finished_idx, built CONCURRENTLY) in place of jobs_finished_idx (finish time
only, dropped CONCURRENTLY after the new index is built), so pruning one state never
walks past the old rows of a state kept longer.

Revision ID: sa_jobs_0013
Revises: sa_jobs_0012
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0013"
down_revision = "sa_jobs_0012"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 13


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
