"""Revision scripts of the ``sa_jobs`` Alembic branch (a package so wheels ship them)."""
