"""The job database under a full disk, and its migrations."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgelm_agent.api.errors import http_status
from edgelm_agent.jobs import store
from edgelm_agent.jobs.database import MIGRATIONS, Database, StorageFull, connect, migrate


def spec(n: int) -> store.JobSpec:
    return store.JobSpec(
        kind="completion", request={"model": "m", "prompt": f"job {n} " + "x" * 2000}
    )


class TestFullDisk:
    def test_full_disk_is_a_clear_error_and_loses_nothing(self, tmp_path):
        """When the database cannot grow, submit fails with StorageFull, the jobs already
        accepted are intact, and submitting works again once there is room."""
        db = Database(tmp_path / "agent.db")
        try:
            db.run_sync(lambda c: c.execute("PRAGMA max_page_count = 40"))  # a "disk" of ~160 KB
            accepted: list[str] = []

            def fill() -> None:
                for n in range(1000):
                    job, _ = db.run_sync(store.submit(spec(n)))
                    accepted.append(job["id"])

            with pytest.raises(StorageFull, match="disk is full"):
                fill()
            assert accepted, "some jobs fit before the disk filled"
            for job_id in accepted:
                job, _ = db.run_sync(store.get(job_id))
                assert job["state"] == "queued"
            db.run_sync(lambda c: c.execute("PRAGMA max_page_count = 100000"))  # room again
            job, created = db.run_sync(store.submit(spec(-1)))
            assert created
            assert job["state"] == "queued"
        finally:
            db.close()

    def test_one_failing_operation_does_not_sink_its_group(self, tmp_path):
        """An operation that raises is rolled back alone; the others in its commit group land."""
        db = Database(tmp_path / "agent.db")
        try:
            good = db.submit(store.submit(spec(1)))
            bad = db.submit(store.cancel("no-such-job"))
            also_good = db.submit(store.submit(spec(2)))
            assert good.result()[1]
            assert also_good.result()[1]
            with pytest.raises(store.JobNotFound):
                bad.result()
        finally:
            db.close()


class TestMigrations:
    def test_each_migration_runs_once_in_order(self, tmp_path):
        """Migrations apply in order, are recorded, and a second run applies nothing."""
        conn = connect(tmp_path / "agent.db")
        assert migrate(conn) == [name for name, _ in MIGRATIONS]
        assert migrate(conn) == []
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"jobs", "outbox", "_migrations"} <= tables

    def test_durability_settings(self, tmp_path):
        """The database runs in WAL mode with synchronous=FULL, as documented."""
        conn = connect(tmp_path / "agent.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert isinstance(conn, sqlite3.Connection)

    def test_upgrade_fingerprints_jobs_stored_before_it(self, tmp_path, monkeypatch):
        """Jobs stored before 0005 get the fingerprint submit() would give them, so their
        idempotency keys are checked like any other."""
        import edgelm_agent.jobs.database as database

        conn = connect(tmp_path / "agent.db")
        monkeypatch.setattr(database, "MIGRATIONS", MIGRATIONS[:4])
        migrate(conn)
        old = store.JobSpec(
            kind="completion", request={"model": "m", "prompt": "hi"}, idempotency_key="k"
        )
        conn.execute(
            "INSERT INTO jobs (id, state, kind, priority, request, idempotency_key, report, "
            "attempts, max_attempts, created_at, updated_at, not_before) "
            "VALUES ('job-old', 'queued', 'completion', 0, ?, 'k', 'local', 0, 3, 1, 1, 0)",
            ('{"model": "m", "prompt": "hi"}',),
        )
        monkeypatch.setattr(database, "MIGRATIONS", MIGRATIONS)
        assert migrate(conn)[:2] == ["0005_idempotency_fingerprint", "0006_job_model"]
        conn.execute("BEGIN")
        same, created = store.submit(old)(conn)
        assert (same["id"], created) == ("job-old", False)
        with pytest.raises(store.IdempotencyKeyReused):
            store.submit(
                store.JobSpec(kind="completion", request={"prompt": "other"}, idempotency_key="k")
            )(conn)
        conn.execute("ROLLBACK")

    def test_upgrade_gives_stored_jobs_their_model(self, tmp_path, monkeypatch):
        """Jobs stored before 0006 get the model their request names (and a row whose request
        no longer decodes gets none, instead of failing the upgrade)."""
        import edgelm_agent.jobs.database as database

        conn = connect(tmp_path / "agent.db")
        monkeypatch.setattr(database, "MIGRATIONS", MIGRATIONS[:5])
        migrate(conn)
        for job_id, request in (("job-a", '{"model": "m", "prompt": "hi"}'), ("job-b", "{oops")):
            conn.execute(
                "INSERT INTO jobs (id, state, kind, priority, request, report, attempts, "
                "max_attempts, created_at, updated_at, not_before) "
                "VALUES (?, 'queued', 'completion', 0, ?, 'local', 0, 3, 1, 1, 0)",
                (job_id, request),
            )
        monkeypatch.setattr(database, "MIGRATIONS", MIGRATIONS)
        assert migrate(conn)[0] == "0006_job_model"
        models = dict(conn.execute("SELECT id, model FROM jobs").fetchall())
        assert models == {"job-a": "m", "job-b": ""}

    def test_upgrade_gives_outbox_messages_ids_and_never_reuses_a_sequence(
        self, tmp_path, monkeypatch
    ):
        """Messages queued before 0007 keep their order and kind and get unique ids; a
        sequence number once used (even by a message since acknowledged) is never reused."""
        import edgelm_agent.jobs.database as database
        from edgelm_agent.jobs import outbox

        conn = connect(tmp_path / "agent.db")
        monkeypatch.setattr(database, "MIGRATIONS", MIGRATIONS[:6])
        migrate(conn)
        for n, cls in enumerate(("result", "event", "telemetry", "result"), start=1):
            conn.execute(
                "INSERT INTO outbox (class, topic, body, bytes, created_at) VALUES (?, ?, ?, 9, 1)",
                (cls, cls, f'{{"n": {n}}}'),
            )
        conn.execute("DELETE FROM outbox WHERE seq = 4")  # acknowledged before the upgrade
        monkeypatch.setattr(database, "MIGRATIONS", MIGRATIONS)
        assert migrate(conn) == [name for name, _ in MIGRATIONS[6:]]
        held = outbox.peek_rows(conn, 10)
        assert [(m.seq, m.kind, m.body) for m in held] == [
            (1, "result", {"n": 1}),
            (2, "event", {"n": 2}),
            (3, "telemetry", {"n": 3}),
        ]
        assert len({m.id for m in held}) == 3
        conn.execute("BEGIN")
        new = outbox.append(conn, outbox.MessageKind.RESULT, {"n": 5})
        conn.execute("COMMIT")
        assert new.seq == 5

    def test_migrations_do_not_load_numpy(self, tmp_path):
        """sqlite_utils would import numpy (16 MB) for nothing; an idle agent must not pay it."""
        code = (
            "import sys, pathlib; from edgelm_agent.jobs.database import connect, migrate; "
            f"migrate(connect(pathlib.Path({str(tmp_path / 'agent.db')!r}))); "
            "assert 'sqlite_utils' in sys.modules; print('numpy' in sys.modules)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "False"


@pytest.fixture
def db(tmp_path: Path):
    database = Database(tmp_path / "agent.db")
    yield database
    database.close()


def sized(n: int, prompt_bytes: int, key: str | None = None) -> store.JobSpec:
    return store.JobSpec(
        kind="completion",
        request={"model": "m", "prompt": f"{n:04d}" + "x" * (prompt_bytes - 4)},
        idempotency_key=key,
    )


class TestQueueBounds:
    def test_past_the_count_cap_a_job_is_refused_with_507(self, db):
        """With max_jobs queued, one more is refused (507 job_queue_full); once one leaves
        the queue there is room again."""
        limits = store.QueueLimits(max_jobs=3, max_bytes=1 << 20)
        ids = [db.run_sync(store.submit(sized(n, 100), queue=limits))[0]["id"] for n in range(3)]
        with pytest.raises(store.JobQueueFull) as refused:
            db.run_sync(store.submit(sized(3, 100), queue=limits))
        assert http_status(refused.value) == (507, "server_error")
        assert refused.value.code == "job_queue_full"
        assert "max_queued_jobs" in str(refused.value)
        db.run_sync(store.cancel(ids[0]))
        assert db.run_sync(store.submit(sized(3, 100), queue=limits))[1]

    def test_past_the_byte_cap_a_job_is_refused(self, db):
        """The queued jobs' bytes are capped too: a job that would pass max_bytes is refused,
        naming the setting, and nothing of it is stored."""
        limits = store.QueueLimits(max_jobs=100, max_bytes=10_000)
        for n in range(2):
            db.run_sync(store.submit(sized(n, 4000), queue=limits))
        with pytest.raises(store.JobQueueFull, match="max_queued_job_bytes"):
            db.run_sync(store.submit(sized(2, 4000), queue=limits))
        page, _ = db.run_sync(store.list_jobs(None, 10, None))
        assert len(page) == 2

    def test_an_idempotent_retry_is_answered_even_when_full(self, db):
        """A client retrying a job it already submitted gets that job back, full or not."""
        limits = store.QueueLimits(max_jobs=1, max_bytes=1 << 20)
        first, _ = db.run_sync(store.submit(sized(0, 100, key="k"), queue=limits))
        again, created = db.run_sync(store.submit(sized(0, 100, key="k"), queue=limits))
        assert (again["id"], created) == (first["id"], False)


class TestListedJobs:
    def test_a_list_holds_summaries_and_show_holds_everything(self, db):
        """A page of jobs carries no request or result bodies, so it stays small; one job
        shown carries them."""
        job, _ = db.run_sync(store.submit(sized(0, 100_000)))
        page, _ = db.run_sync(store.list_jobs(None, 10, None))
        [listed] = page
        assert "request" not in listed
        assert "result" not in listed
        assert listed["id"] == job["id"]
        assert listed["model"] == "m"
        assert {"state", "kind", "priority", "attempts", "max_attempts"} <= set(listed)
        assert len(json.dumps(page)) < 2000
        shown, _ = db.run_sync(store.get(job["id"]))
        assert shown["request"]["prompt"].startswith("0000")

    def test_text_is_stored_as_utf8_not_escapes(self, db):
        """Non-Latin text is stored as itself: ``\\uXXXX`` escapes would take six bytes a
        character of the disk and of the byte cap."""
        spec = store.JobSpec(
            kind="completion", request={"model": "m", "prompt": "漢字"}, metadata={"k": "é"}
        )
        job, _ = db.run_sync(store.submit(spec))
        row = db.run_sync(
            lambda c: c.execute(
                "SELECT request, metadata FROM jobs WHERE id = ?", (job["id"],)
            ).fetchone()
        )
        assert "漢字" in row["request"]
        assert "é" in row["metadata"]


class TestClaimByName:
    def test_a_job_for_name_at_version_runs_on_that_version_only(self, db):
        """``tiny`` and ``tiny@1.0`` are one model while 1.0 serves: the worker claims both
        queues in priority then arrival order; a job for ``tiny@2.0`` waits for 2.0."""

        def job(model: str, priority: int = 0) -> str:
            request = {"model": model, "prompt": "hi", "max_tokens": 1}
            submitted = store.JobSpec(kind="completion", request=request, priority=priority)
            return str(db.run_sync(store.submit(submitted))[0]["id"])

        plain = job("tiny")
        pinned = job("tiny@1.0")
        urgent = job("tiny@1.0", priority=5)
        later = job("tiny@2.0")
        names = ("tiny", "tiny@1.0")
        claimed = [db.run_sync(store.claim(time.time(), names)) for _ in range(4)]
        assert [c["id"] if c else None for c in claimed] == [urgent, plain, pinned, None]
        assert db.run_sync(store.next_due(names)) is None
        assert db.run_sync(store.next_due(("tiny", "tiny@2.0"))) is not None
        assert db.run_sync(store.claim(time.time(), ("tiny", "tiny@2.0")))["id"] == later
