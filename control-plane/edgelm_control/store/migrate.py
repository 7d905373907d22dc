"""Alembic migrations, run programmatically at start: no ``alembic.ini``, no command line.

The configuration is built here and points at the migrations shipped inside the package.
Every replica runs :func:`upgrade` when it starts; on PostgreSQL a transaction-scoped advisory
lock makes the second replica wait for the first instead of racing it to create the tables,
and on SQLite the write transaction does the same. Each migration is one step of one
transaction, so a failed upgrade leaves the schema as it was.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# An arbitrary constant shared by every replica: "the edgelm schema lock".
_ADVISORY_LOCK_KEY = 0x6564676C6D


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS_DIR}")
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


async def upgrade(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision, in one transaction."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY}
            )
        await conn.run_sync(_upgrade)
