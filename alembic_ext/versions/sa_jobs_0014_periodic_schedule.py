"""sa-jobs schema version 14: each row of the periodic table records the schedule (cron
expression and time zone) it was last fired for, so a leader can tell an edited schedule
from downtime (an added nullable column: a catalog-only change).

Revision ID: sa_jobs_0014
Revises: sa_jobs_0013
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0014"
down_revision = "sa_jobs_0013"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 14


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
