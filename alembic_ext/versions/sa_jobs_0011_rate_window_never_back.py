"""sa-jobs schema version 11: the limited claim function never moves a queue's rate
window back; a claimer that takes the queue lock after a claim of a later window counts
against that window (up to version 10 it started its own window's count again).

Revision ID: sa_jobs_0011
Revises: sa_jobs_0010
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0011"
down_revision = "sa_jobs_0010"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 11


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
