"""Alembic environment: runs on the connection handed over by ``fashion_tagging.db.engine.migrate``
(which holds the advisory lock), or on ``get_engine()`` when invoked from the alembic command line."""

from __future__ import annotations

from alembic import context

from fashion_tagging.db.schema import metadata


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    from fashion_tagging.db.engine import get_engine

    with get_engine().begin() as own_connection:
        _run(own_connection)
