"""Alembic migrations of the fleet registry (run by ``fleet.db.Registry.migrate()``; no alembic.ini needed)."""
