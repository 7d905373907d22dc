"""The agent's SQLite database: one thread owns the connection, writes commit in groups.

Durability, chosen on purpose:

* ``journal_mode=WAL``: readers never block the writer, and a crash at any moment leaves the
  database as of the last commit.
* ``synchronous=FULL``: every commit is fsynced before it returns. A job accepted with 202 is
  on disk, even through a power cut, which is the promise of this queue. (``NORMAL`` would be
  faster, but in WAL mode it can lose the last commits on power loss.)
* **Group commit** pays for that: operations that arrive while a commit is in progress are run
  together in the next transaction, each in its own savepoint, and share one fsync. Throughput
  grows with concurrency instead of being capped by the disk's fsync rate.

Migrations are named and ordered, each applied in its own transaction with sqlite-utils, and
recorded in ``_migrations`` so each runs exactly once.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import sys
import threading
import types
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from edgelm_agent.errors import EdgelmError
from edgelm_agent.jobs.store import spec_of_row

if TYPE_CHECKING:
    import sqlite_utils

log = structlog.get_logger(__name__)
T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]
MAX_GROUP = 512  # operations per transaction; bounds latency for the first one in a group


class StorageFull(EdgelmError):
    """The disk is full: the operation was rolled back and nothing is lost."""

    code = "storage_full"


class StorageError(EdgelmError):
    code = "storage_error"


def _migration_jobs(db: sqlite_utils.Database) -> None:
    jobs = db.table("jobs")
    jobs.create(
        {
            "seq": int,
            "id": str,
            "state": str,
            "kind": str,
            "priority": int,
            "request": str,
            "idempotency_key": str,
            "metadata": str,
            "report": str,
            "attempts": int,
            "max_attempts": int,
            "created_at": float,
            "updated_at": float,
            "started_at": float,
            "finished_at": float,
            "not_before": float,
            "deadline": float,
            "result": str,
            "error": str,
        },
        pk="seq",
        not_null={
            "id",
            "state",
            "kind",
            "priority",
            "request",
            "report",
            "attempts",
            "max_attempts",
            "created_at",
            "updated_at",
            "not_before",
        },
    )
    jobs.create_index(["id"], unique=True)
    jobs.create_index(["idempotency_key"], unique=True)
    jobs.create_index(["state", "priority", "seq"])


def _migration_outbox(db: sqlite_utils.Database) -> None:
    outbox = db.table("outbox")
    outbox.create(
        {"seq": int, "class": str, "topic": str, "body": str, "bytes": int, "created_at": float},
        pk="seq",
        not_null={"class", "topic", "body", "bytes", "created_at"},
    )
    outbox.create_index(["class", "seq"])


def _migration_queue_indexes(db: sqlite_utils.Database) -> None:
    # The worker's pick (most urgent first), its deadline sweep and its "when is the next one
    # due" must not scan every queued job: each gets an index that answers it directly.
    db.execute("DROP INDEX IF EXISTS idx_jobs_state_priority_seq")
    db.execute("CREATE INDEX idx_jobs_queue ON jobs (state, priority DESC, seq)")
    db.execute("CREATE INDEX idx_jobs_due ON jobs (state, not_before)")
    db.execute(
        "CREATE INDEX idx_jobs_deadline ON jobs (deadline) "
        "WHERE state = 'queued' AND deadline IS NOT NULL"
    )


def _migration_outbox_autoincrement(db: sqlite_utils.Database) -> None:
    # Acks name messages by sequence number and may repeat, so a number must never be reused,
    # even after the outbox has drained empty: AUTOINCREMENT guarantees that.
    db.execute("ALTER TABLE outbox RENAME TO outbox_old")
    db.execute(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, class TEXT NOT NULL, "
        "topic TEXT NOT NULL, body TEXT NOT NULL, bytes INTEGER NOT NULL, "
        "created_at FLOAT NOT NULL)"
    )
    db.execute(
        "INSERT INTO outbox SELECT seq, class, topic, body, bytes, created_at FROM outbox_old"
    )
    db.execute("DROP TABLE outbox_old")
    db.execute("CREATE INDEX idx_outbox_class_seq ON outbox (class, seq)")


def _migration_idempotency_fingerprint(db: sqlite_utils.Database) -> None:
    # A key reused for a different submission is a client bug that would otherwise hand back
    # someone else's job silently; the fingerprint lets submit() tell the two apart. Jobs
    # already stored get theirs from their row, which holds every field it covers.
    db.table("jobs").add_column("fingerprint", str)
    for row in db.conn.execute("SELECT * FROM jobs").fetchall():
        db.conn.execute(
            "UPDATE jobs SET fingerprint = ? WHERE seq = ?",
            (spec_of_row(row).fingerprint(), row["seq"]),
        )


def _migration_job_model(db: sqlite_utils.Database) -> None:
    # A job runs only on the model it names and waits for it otherwise, so the worker's pick
    # and its "next due" look at one model's queue; both get an index that answers directly.
    db.table("jobs").add_column("model", str)
    db.execute(
        "UPDATE jobs SET model = CASE WHEN json_valid(request) "
        "THEN coalesce(json_extract(request, '$.model'), '') ELSE '' END"
    )
    db.execute("CREATE INDEX idx_jobs_model_queue ON jobs (state, model, priority DESC, seq)")
    db.execute("CREATE INDEX idx_jobs_model_due ON jobs (state, model, not_before)")


def _migration_outbox_messages(db: sqlite_utils.Database) -> None:
    # Each message gets its own id (what the control plane acknowledges and deduplicates
    # on) and a schema version, and a kind replaces the topic: sync picks topics as it sends.
    db.execute("ALTER TABLE outbox RENAME TO outbox_old")
    db.execute(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
        "message_id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, schema_version INTEGER NOT NULL, "
        "body TEXT NOT NULL, bytes INTEGER NOT NULL, created_at FLOAT NOT NULL)"
    )
    db.execute(
        "INSERT INTO outbox (seq, message_id, kind, schema_version, body, bytes, created_at) "
        "SELECT seq, lower(hex(randomblob(16))), class, 1, body, bytes, created_at "
        "FROM outbox_old"
    )
    # Sequence numbers are never reused, even past rows already acknowledged and gone.
    db.execute(
        "UPDATE sqlite_sequence SET seq = max(seq, coalesce((SELECT seq FROM sqlite_sequence "
        "WHERE name = 'outbox_old'), 0)) WHERE name = 'outbox'"
    )
    db.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'outbox', seq FROM sqlite_sequence "
        "WHERE name = 'outbox_old' AND NOT EXISTS "
        "(SELECT 1 FROM sqlite_sequence WHERE name = 'outbox')"
    )
    db.execute("DROP TABLE outbox_old")
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox_old'")
    db.execute("CREATE INDEX idx_outbox_kind_seq ON outbox (kind, seq)")


def _migration_sync_state(db: sqlite_utils.Database) -> None:
    # Fleet sync's own small facts, in the same database as the outbox so that moving the
    # registry's events into the outbox and advancing the cursor is one transaction.
    db.execute("CREATE TABLE sync_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


def _stored_size(row: str) -> str:
    """SQL for the bytes a job row holds in its request and metadata (see store.stored_bytes)."""
    return (
        f"length(CAST({row}.request AS BLOB)) + coalesce(length(CAST({row}.metadata AS BLOB)), 0)"
    )


def _migration_queue_totals(db: sqlite_utils.Database) -> None:
    # The queue's caps (how many jobs wait, and how many bytes they hold) are checked at every
    # submission. Triggers keep a running total in the transaction of each change, so the
    # check reads one row instead of summing every waiting request.
    db.execute(
        "CREATE TABLE job_queue_totals (id INTEGER PRIMARY KEY CHECK (id = 1), "
        "jobs INTEGER NOT NULL, bytes INTEGER NOT NULL)"
    )
    db.execute(
        "INSERT INTO job_queue_totals SELECT 1, count(*), "  # noqa: S608  # our own SQL
        f"coalesce(sum({_stored_size('jobs')}), 0) FROM jobs WHERE state = 'queued'"
    )
    db.execute(
        "CREATE TRIGGER queued_insert AFTER INSERT ON jobs "  # noqa: S608  # our own SQL
        "WHEN NEW.state = 'queued' BEGIN UPDATE job_queue_totals SET jobs = jobs + 1, "
        f"bytes = bytes + {_stored_size('NEW')} WHERE id = 1; END"
    )
    db.execute(
        "CREATE TRIGGER queued_delete AFTER DELETE ON jobs "  # noqa: S608  # our own SQL
        "WHEN OLD.state = 'queued' BEGIN UPDATE job_queue_totals SET jobs = jobs - 1, "
        f"bytes = bytes - {_stored_size('OLD')} WHERE id = 1; END"
    )
    db.execute(
        "CREATE TRIGGER queued_update AFTER UPDATE ON jobs "  # noqa: S608  # our own SQL
        "WHEN OLD.state = 'queued' OR NEW.state = 'queued' BEGIN UPDATE job_queue_totals SET "
        "jobs = jobs - (OLD.state = 'queued') + (NEW.state = 'queued'), "
        f"bytes = bytes - (OLD.state = 'queued') * ({_stored_size('OLD')}) "
        f"+ (NEW.state = 'queued') * ({_stored_size('NEW')}) WHERE id = 1; END"
    )


MIGRATIONS: tuple[tuple[str, Callable[[sqlite_utils.Database], None]], ...] = (
    ("0001_jobs", _migration_jobs),
    ("0002_outbox", _migration_outbox),
    ("0003_queue_indexes", _migration_queue_indexes),
    ("0004_outbox_autoincrement", _migration_outbox_autoincrement),
    ("0005_idempotency_fingerprint", _migration_idempotency_fingerprint),
    ("0006_job_model", _migration_job_model),
    ("0007_outbox_messages", _migration_outbox_messages),
    ("0008_sync_state", _migration_sync_state),
    ("0009_queue_totals", _migration_queue_totals),
)


def _import_sqlite_utils() -> types.ModuleType:
    """sqlite_utils, imported only when a migration is due, and without numpy.

    sqlite_utils imports numpy whenever it is installed (llama-cpp-python installs it), only
    to convert numpy values, which the agent never stores. That import alone would cost an idle
    agent about 16 MB of its 80 MB budget, so numpy is hidden while sqlite_utils loads; a model
    backend that needs numpy still imports it normally afterwards.
    """
    hide = "numpy" not in sys.modules
    if hide:
        sys.modules["numpy"] = None  # type: ignore[assignment]  # makes `import numpy` fail
    try:
        import sqlite_utils
    finally:
        if hide:
            del sys.modules["numpy"]
    return sqlite_utils


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the migrations not applied yet, in order, each in its own transaction."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, "
        "applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
    )
    done = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    pending = [(name, apply) for name, apply in MIGRATIONS if name not in done]
    if not pending:
        return []
    sqlite_utils = _import_sqlite_utils()
    applied = []
    for name, apply in pending:
        conn.execute("BEGIN IMMEDIATE")
        try:
            apply(sqlite_utils.Database(conn))
            conn.execute("INSERT INTO _migrations (name) VALUES (?)", (name,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _translate(exc: sqlite3.Error) -> EdgelmError:
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
        return StorageFull(f"the state disk is full; nothing was written ({exc})")
    return StorageError(f"database error: {exc}")


class _GroupLost(Exception):  # internal signal, never escapes this module
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Database:
    """Runs operations on the agent's database in its one writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ops: queue.SimpleQueue[tuple[Operation, Future[Any]] | None] = queue.SimpleQueue()
        conn = connect(path)
        migrate(conn)
        self._thread = threading.Thread(
            target=self._serve, args=(conn,), daemon=True, name="edgelm-db"
        )
        self._thread.start()
        # Reads that need not be in the writer's transaction (a job's place in the queue,
        # listings) run on their own connection: in WAL mode they never block the writer.
        self._local = threading.local()
        self._reader = ThreadPoolExecutor(1, "edgelm-db-read", initializer=self._open_reader)

    def _open_reader(self) -> None:
        self._local.conn = connect(self.path)

    async def read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                return op(self._local.conn)
            except sqlite3.Error as exc:
                raise _translate(exc) from exc

        return await asyncio.wrap_future(self._reader.submit(run))

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        self._ops.put((op, future))
        return future

    def run_sync(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """From a thread that is not the event loop (CLI, tests, benchmarks)."""
        return self.submit(op).result()

    async def run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.wrap_future(self.submit(op))

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        self._ops.put(None)
        self._thread.join(timeout=30)

    def _serve(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                first = self._ops.get()
                if first is None:
                    return
                group = [first]
                while len(group) < MAX_GROUP:
                    try:
                        item = self._ops.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._ops.put(None)  # finish this group, then stop
                        break
                    group.append(item)
                self._commit_group(conn, group)
        finally:
            conn.close()

    def _commit_group(
        self, conn: sqlite3.Connection, group: list[tuple[Operation, Future[Any]]]
    ) -> None:
        outcomes: list[tuple[Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in group:
                if not future.set_running_or_notify_cancel():
                    continue  # the caller gave up (a client hung up): nothing to run or answer
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((future, op(conn), None))
                except Exception as failure:
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back itself (disk full, I/O
                        # error): every operation of the group is lost, this error says why.
                        raise _GroupLost(failure) from failure
                    conn.execute("ROLLBACK TO op")  # this operation only; the group goes on
                    outcomes.append((future, None, failure))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except (sqlite3.Error, _GroupLost) as commit_error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            cause = commit_error.cause if isinstance(commit_error, _GroupLost) else commit_error
            error = (
                _translate(cause)
                if isinstance(cause, sqlite3.Error)
                else StorageError(f"database operation failed: {cause}")
            )
            log.error("database_commit_failed", error=str(cause), operations=len(group))
            for _, future in group:
                if not future.done():
                    future.set_exception(error)
            return
        for future, result, err in outcomes:
            if err is None:
                future.set_result(result)
            else:
                future.set_exception(_translate(err) if isinstance(err, sqlite3.Error) else err)
