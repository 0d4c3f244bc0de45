"""sa-jobs schema version 12: a partitioned claim on a queue whose concurrency or rate
limit narrows its head window looks past that window (up to version 11, only past the
worker's whole scan).

Revision ID: sa_jobs_0012
Revises: sa_jobs_0011
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0012"
down_revision = "sa_jobs_0011"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 12


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
