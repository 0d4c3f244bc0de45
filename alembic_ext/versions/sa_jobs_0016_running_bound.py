"""sa-jobs schema version 16: a limited queue keeps an upper bound of its running jobs on its
row (queues.running_bound, running_counted_at: nullable columns, a catalog-only change), and
the claim function skips counting them while the bound leaves every limit slack. Releases of
version 15 may run on it (their claims go through this function).

Revision ID: sa_jobs_0016
Revises: sa_jobs_0015
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0016"
down_revision = "sa_jobs_0015"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 16


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
