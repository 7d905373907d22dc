"""The database: one SQLAlchemy asyncio engine, migrations at start, reads and writes.

:class:`Store` is the one object that owns the engine. Callers open a transaction with
:meth:`Store.write` (or a plain connection with :meth:`Store.read`) and hand the connection to
the query modules (:mod:`.devices`, :mod:`.rollouts`, ...), so one transaction can span
several of them: an event stored and a rollout row moved commit together or not at all.

SQLite and PostgreSQL differ in two ways that matter here, and both are handled below:

* **Transactions.** Python's sqlite3 driver opens transactions lazily, before the first
  write, so a read-then-write "transaction" is not one. The engine switches that off and
  emits ``BEGIN`` itself (SQLAlchemy's documented recipe for aiosqlite).
* **Writers.** SQLite has one writer at a time; two transactions that both read and then
  write can deadlock into ``database is locked``. As datasette does, writes go through one
  lane: an asyncio lock around every write transaction. PostgreSQL runs writes concurrently,
  and correctness across replicas rests on compare-and-set updates
  (``UPDATE ... WHERE state = :expected``), never on this lock.

Driver errors that mean "the database is not there" become :class:`StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from edgelm_control.errors import StoreUnavailable
from edgelm_control.store.migrate import upgrade

log = structlog.get_logger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


def async_url(url: str) -> str:
    """The asyncio driver's URL: ``sqlite:///x`` → ``sqlite+aiosqlite:///x``, and so on."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ValueError(f"the store runs on SQLite or PostgreSQL, not {backend!r}")


def redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


class Store:
    """The engine, the write lane and the migrations. Build with :meth:`open`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name  # "sqlite" or "postgresql"
        self._write_lane = asyncio.Lock() if self.dialect == "sqlite" else None

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> Store:
        """Connect, and bring the schema up to date (``migrate``)."""
        engine = create_async_engine(async_url(url), pool_pre_ping=True)
        if engine.dialect.name == "sqlite":
            _prepare_sqlite(engine)
        store = cls(engine)
        if migrate:
            try:
                await upgrade(engine)
            except BaseException:
                await engine.dispose()
                raise
        log.info("store_opened", url=redacted(url), dialect=store.dialect)
        return store

    async def close(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (autobegun; rolled back on exit, which a read needs)."""
        try:
            async with self.engine.connect() as conn:
                yield conn
        except (OperationalError, InterfaceError) as exc:
            raise _unavailable(exc) from exc

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        lane = self._write_lane
        try:
            if lane is None:
                async with self.engine.begin() as conn:
                    yield conn
            else:
                async with lane, self.engine.begin() as conn:
                    yield conn
        except (OperationalError, InterfaceError) as exc:
            raise _unavailable(exc) from exc

    async def ping(self, timeout_s: float = 5.0) -> None:
        """Raise :class:`StoreUnavailable` unless the database answers within ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s), self.read() as conn:
                await conn.execute(text("SELECT 1"))
        except TimeoutError as exc:
            raise StoreUnavailable(f"the store did not answer within {timeout_s} s") from exc
        except DBAPIError as exc:
            raise _unavailable(exc) from exc
        except OSError as exc:
            raise StoreUnavailable(f"the store cannot be reached: {exc}") from exc


def _unavailable(exc: DBAPIError) -> StoreUnavailable:
    reason = str(exc.orig) if exc.orig is not None else type(exc).__name__
    return StoreUnavailable(f"the store failed: {reason.splitlines()[0][:300]}")


def _prepare_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Turn off the driver's own transaction handling; "begin" below emits BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets readers run beside the writer; NORMAL syncs at checkpoints, which in WAL
        # mode loses no committed transaction on a process crash (only on a power cut).
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")
