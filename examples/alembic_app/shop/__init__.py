"""A tiny shop whose schema is managed by Alembic and whose emails are sa-jobs jobs."""
