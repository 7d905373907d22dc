"""Alembic's environment: run the migrations on the connection the caller hands over.

There is no ``alembic.ini``: :func:`edgelm_control.store.migrate.upgrade` builds the
configuration in code and puts an open connection, already in a transaction, into
``config.attributes["connection"]``; the migrations run inside that transaction.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=None,
    # SQLite cannot ALTER most things in place; batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
