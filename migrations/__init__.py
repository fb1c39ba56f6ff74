"""Alembic migrations for the broker's database (a package so installs carry them)."""
