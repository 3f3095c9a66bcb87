"""Alembic environment: ``Registry.migrate()`` passes its connection in ``config.attributes["connection"]``.

Standalone (``alembic -x url=sqlite:///fleet.db upgrade head`` with a config naming this directory) it builds
its own engine through ``fleet.db.Registry`` from the ``url`` argument or ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context

from fleet.db import Base, Registry

config = context.config
target_metadata = Base.metadata


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode recreates tables
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    if context.is_offline_mode():
        context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    registry = Registry(url)
    try:
        with registry.engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        registry.close()


run()
