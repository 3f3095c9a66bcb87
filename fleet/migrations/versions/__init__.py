"""Alembic revision scripts, applied in order by ``Registry.migrate()``."""
