"""sa-jobs schema version 15: each version records the oldest release that may still run on
it (schema_version.runs_from, an added nullable column: a catalog-only change), so that a
release keeps running on a newer schema whose migration was additive. Version 14's
releases may run on it, but do not read the column: they still refuse it.

Revision ID: sa_jobs_0015
Revises: sa_jobs_0014
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic_ext import downgrade_version, upgrade_version

revision = "sa_jobs_0015"
down_revision = "sa_jobs_0014"
branch_labels = None
depends_on = None

SA_JOBS_VERSION = 15


def upgrade() -> None:
    upgrade_version(SA_JOBS_VERSION)


def downgrade() -> None:
    downgrade_version(SA_JOBS_VERSION)
