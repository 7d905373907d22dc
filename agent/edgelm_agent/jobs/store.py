"""Jobs in SQLite: submit, claim, finish, cancel, recover, prune.

Every state change goes through :func:`~edgelm_agent.jobs.lifecycle.next_state` and an
``UPDATE … WHERE state = ?`` guarded by the state it expects, so a change that lost a race
(a cancel against a finish, say) changes nothing. A result is written by the same statement that
moves the job to ``succeeded``, guarded by the attempt number, so execution is at least once but
each result is stored exactly once, together with its outbox message in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgelm_agent.errors import EdgelmError, InvalidRequest, RequestError, shown
from edgelm_agent.jobs import outbox
from edgelm_agent.jobs.lifecycle import (
    FINAL,
    JobEvent,
    JobState,
    backoff_s,
    failure_event,
    next_state,
)
from edgelm_agent.jobs.outbox import MessageKind, OutboxLimits


class JobNotFound(RequestError):
    code = "job_not_found"


class JobConflict(RequestError):
    code = "job_conflict"


class IdempotencyKeyReused(RequestError):
    """The IETF Idempotency-Key draft's answer to a key replayed with another payload."""

    code = "idempotency_key_reused"


class JobQueueFull(RequestError):
    """The waiting jobs are at one of the queue's caps; the message names which."""

    code = "job_queue_full"


@dataclass(frozen=True)
class QueueLimits:
    """How much may wait in the queue: jobs, and the bytes of their requests and metadata.
    Any local user can submit jobs; without these, they could fill the disk, and a page of
    ``GET /v1/jobs`` the memory."""

    max_jobs: int = 10_000
    max_bytes: int = 256 << 20


def stored_bytes(request: str, metadata: str | None) -> int:
    """The bytes a job holds in the queue: its stored request and metadata, as UTF-8 (the
    database's running total counts the same, see database.py)."""
    return len(request.encode()) + (len(metadata.encode()) if metadata is not None else 0)


def queued_totals(conn: sqlite3.Connection) -> tuple[int, int]:
    """(jobs, bytes) waiting in the queue now."""
    jobs, size = conn.execute("SELECT jobs, bytes FROM job_queue_totals WHERE id = 1").fetchone()
    return int(jobs), int(size)


def _as_json(value: Any) -> str:
    """JSON as stored: UTF-8 text as itself, not as six-byte ``\\uXXXX`` escapes."""
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class JobSpec:
    """A validated submission (see :mod:`edgelm_agent.api.jobs_routes` for the wire form)."""

    kind: str  # "chat" or "completion"
    request: dict[str, Any]
    priority: int = 0
    deadline: float | None = None
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = None
    report: str = "local"  # or "upstream": the result goes to the outbox too
    max_attempts: int = 3
    #: Accept the job even if its model is not on the device (yet): fleet jobs may arrive
    #: before their model. Only admission looks at it; it is not stored.
    wait_for_model: bool = False

    @property
    def model(self) -> str:
        """The model the job runs on; it waits in the queue until that model is served."""
        return str(self.request.get("model", ""))

    def fingerprint(self) -> str:
        """What makes two submissions the same job. The deadline is left out: a retry with the
        same ``ttl_s`` computes a later one."""
        same = {
            "kind": self.kind,
            "request": self.request,
            "priority": self.priority,
            "metadata": self.metadata,
            "report": self.report,
            "max_attempts": self.max_attempts,
        }
        canonical = json.dumps(same, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def spec_of_row(row: sqlite3.Row) -> JobSpec:
    """The submission a stored job was made from."""
    return JobSpec(
        kind=row["kind"],
        request=json.loads(row["request"]),
        priority=row["priority"],
        deadline=row["deadline"],
        idempotency_key=row["idempotency_key"],
        metadata=json.loads(row["metadata"]) if row["metadata"] else None,
        report=row["report"],
        max_attempts=row["max_attempts"],
    )


#: What a listed job carries: everything but its request and result, which can be megabytes
#: each; ``GET /v1/jobs/{id}`` shows them.
_SUMMARY_COLUMNS = (
    "seq, id, state, kind, priority, model, idempotency_key, metadata, report, attempts, "
    "max_attempts, created_at, updated_at, started_at, finished_at, deadline, error"
)


def _job_summary(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "job",
        "state": row["state"],
        "kind": row["kind"],
        "model": row["model"],
        "priority": row["priority"],
        "idempotency_key": row["idempotency_key"],
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        "report": row["report"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "deadline": row["deadline"],
        "error": json.loads(row["error"]) if row["error"] else None,
    }


def _job_view(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "job",
        "state": row["state"],
        "kind": row["kind"],
        "priority": row["priority"],
        "request": json.loads(row["request"]),
        "idempotency_key": row["idempotency_key"],
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        "report": row["report"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "deadline": row["deadline"],
        "result": json.loads(row["result"]) if row["result"] else None,
        "error": json.loads(row["error"]) if row["error"] else None,
    }


def _position(conn: sqlite3.Connection, row: sqlite3.Row) -> int | None:
    if row["state"] != JobState.QUEUED:
        return None
    # Only jobs for the same model are ahead: the others wait for a model of their own.
    (ahead,) = conn.execute(
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND model = ? AND "
        "(priority > ? OR (priority = ? AND seq < ?))",
        (row["model"], row["priority"], row["priority"], row["seq"]),
    ).fetchone()
    return int(ahead)


def _row(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(f"no job {shown(job_id)}", param="id")
    return row  # type: ignore[no-any-return]


def _transition(
    conn: sqlite3.Connection, row: sqlite3.Row, event: JobEvent, **fields: Any
) -> sqlite3.Row:
    state = next_state(JobState(row["state"]), event)
    now = time.time()
    fields = {"state": str(state), "updated_at": now, **fields}
    if state in FINAL:
        fields.setdefault("finished_at", now)
    assignments = ", ".join(f"{k} = ?" for k in fields)
    changed = conn.execute(
        f"UPDATE jobs SET {assignments} WHERE seq = ? AND state = ? AND attempts = ?",  # noqa: S608  # column names are ours, values are bound
        (*fields.values(), row["seq"], row["state"], row["attempts"]),
    ).rowcount
    if not changed:
        raise JobConflict(f"job {row['id']} changed meanwhile; it is no longer {row['state']}")
    return _row(conn, row["id"])


def submit(
    spec: JobSpec, limits: OutboxLimits | None = None, queue: QueueLimits | None = None
) -> Any:
    """Store a new job (or find the one its idempotency key names). A job past the queue's
    caps is refused, and an upstream job while the outbox is full, both checked in the same
    transaction that stores it."""
    fingerprint = spec.fingerprint()
    limits = limits or OutboxLimits()
    queue = queue or QueueLimits()
    request = _as_json(spec.request)
    metadata = _as_json(spec.metadata) if spec.metadata is not None else None

    def op(conn: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
        if spec.idempotency_key is not None:
            existing = conn.execute(
                "SELECT * FROM jobs WHERE idempotency_key = ?", (spec.idempotency_key,)
            ).fetchone()
            if existing is not None:
                if existing["fingerprint"] != fingerprint:
                    raise IdempotencyKeyReused(
                        f"idempotency key {spec.idempotency_key!r} was already used for a "
                        f"different submission (job {existing['id']}); use a new key",
                        param="idempotency_key",
                    )
                return _job_view(existing), False
        _check_room(conn, queue, stored_bytes(request, metadata))
        if spec.report == "upstream" and not outbox.has_room(conn, limits):
            raise OutboxFullForJobs(
                "the outbox for headquarters is full; upstream jobs are refused until the "
                "link is back and it drains (local jobs are still accepted)"
            )
        now = time.time()
        job_id = "job-" + secrets.token_hex(12)
        conn.execute(
            "INSERT INTO jobs (id, state, kind, priority, request, idempotency_key, metadata, "
            "report, attempts, max_attempts, created_at, updated_at, not_before, deadline, "
            "fingerprint, model) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, 0, ?, ?, ?)",
            (
                job_id,
                spec.kind,
                spec.priority,
                request,
                spec.idempotency_key,
                metadata,
                spec.report,
                spec.max_attempts,
                now,
                now,
                spec.deadline,
                fingerprint,
                spec.model,
            ),
        )
        return _job_view(_row(conn, job_id)), True

    return op


def _check_room(conn: sqlite3.Connection, queue: QueueLimits, size: int) -> None:
    waiting, held = queued_totals(conn)
    if waiting >= queue.max_jobs:
        raise JobQueueFull(
            f"{waiting} jobs are waiting, as many as the queue holds (max_queued_jobs = "
            f"{queue.max_jobs}); submit again once some have run, or cancel some"
        )
    if held + size > queue.max_bytes:
        raise JobQueueFull(
            f"the waiting jobs hold {held} bytes, and this one ({size} bytes) would pass "
            f"max_queued_job_bytes ({queue.max_bytes}); submit again once some have run"
        )


def position(job_id: str) -> Any:
    def op(conn: sqlite3.Connection) -> int | None:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _position(conn, row) if row is not None else None

    return op


class OutboxFullForJobs(RequestError):
    code = "outbox_full"


def get(job_id: str) -> Any:
    def op(conn: sqlite3.Connection) -> tuple[dict[str, Any], int | None]:
        row = _row(conn, job_id)
        return _job_view(row), _position(conn, row)

    return op


def list_jobs(state: str | None, limit: int, cursor: int | None) -> Any:
    if state is not None and state not in set(JobState):
        raise InvalidRequest(
            f"unknown state {shown(state)}; one of {', '.join(s.value for s in JobState)}",
            param="state",
        )

    def op(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], int | None]:
        sql = f"SELECT {_SUMMARY_COLUMNS} FROM jobs WHERE seq > ?"  # noqa: S608  # our columns
        args: list[Any] = [cursor or 0]
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        rows = conn.execute(sql + " ORDER BY seq LIMIT ?", (*args, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return [_job_summary(r) for r in rows], (rows[-1]["seq"] if more and rows else None)

    return op


def cancel(job_id: str) -> Any:
    """Cancel a queued or running job; returns (job, was_running)."""

    def op(conn: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
        row = _row(conn, job_id)
        state = JobState(row["state"])
        if state in FINAL:
            raise JobConflict(f"job {job_id} is already {state}; it cannot be cancelled")
        error = {"code": "cancelled", "message": "cancelled on the device"}
        after = _transition(conn, row, JobEvent.CANCEL, error=json.dumps(error))
        _report_if_final(conn, after, {"error": error})
        return _job_view(after), state == JobState.RUNNING

    return op


def _expire_overdue(conn: sqlite3.Connection, now: float) -> int:
    # The partial index holds only waiting jobs with a deadline; the planner would otherwise
    # scan every queued job, on every claim.
    expired = conn.execute(
        "SELECT * FROM jobs INDEXED BY idx_jobs_deadline "
        "WHERE state = 'queued' AND deadline IS NOT NULL AND deadline < ?",
        (now,),
    ).fetchall()
    error = {"code": "expired", "message": "deadline passed before the job could run"}
    for row in expired:
        after = _transition(conn, row, JobEvent.EXPIRE, error=json.dumps(error))
        _report_if_final(conn, after, {"error": error})
    return len(expired)


def expire(now: float) -> Any:
    """Expire every waiting job past its deadline; returns how many. The worker runs this
    while no model is loaded, so a job's TTL means the same with or without one."""

    def op(conn: sqlite3.Connection) -> int:
        return _expire_overdue(conn, now)

    return op


def claim(now: float, names: str | Sequence[str]) -> Any:
    """Expire what is past its deadline, then start the most urgent due job for the model
    that ``names`` name (``tiny`` and ``tiny@1.0`` are one model: see ``ServingModel``)."""
    models = (names,) if isinstance(names, str) else tuple(names)

    def op(conn: sqlite3.Connection) -> dict[str, Any] | None:
        _expire_overdue(conn, now)
        while True:
            # Walk each name's queue in its own order and stop at the first job that is due.
            # Left to itself, the planner picks the not_before index and sorts every due job
            # instead, which costs milliseconds with thousands queued. The best head wins.
            heads = [
                conn.execute(
                    "SELECT * FROM jobs INDEXED BY idx_jobs_model_queue WHERE state = 'queued' "
                    "AND model = ? AND not_before <= ? ORDER BY priority DESC, seq LIMIT 1",
                    (model, now),
                ).fetchone()
                for model in models
            ]
            found = [head for head in heads if head is not None]
            if not found:
                return None
            row = min(found, key=lambda head: (-head["priority"], head["seq"]))
            started = _transition(
                conn, row, JobEvent.START, attempts=row["attempts"] + 1, started_at=now
            )
            try:
                return _job_view(started)
            except ValueError:
                # A row that no longer decodes (edited by hand, a disk fault) would be picked
                # first forever and stall the queue: it fails, and the next job is taken.
                error = {"code": "corrupt_job", "message": "the stored job cannot be read"}
                after = _transition(conn, started, JobEvent.FAIL_PERMANENT, error=json.dumps(error))
                _report_if_final(conn, after, {"error": error})

    return op


def next_due(names: str | Sequence[str]) -> Any:
    """When the next job for the model ``names`` name becomes due (a retry backing off), if
    any is queued."""
    models = (names,) if isinstance(names, str) else tuple(names)

    def op(conn: sqlite3.Connection) -> float | None:
        dues = [
            conn.execute(
                "SELECT min(not_before) FROM jobs INDEXED BY idx_jobs_model_due "
                "WHERE state = 'queued' AND model = ?",
                (model,),
            ).fetchone()[0]
            for model in models
        ]
        found = [float(due) for due in dues if due is not None]
        return min(found) if found else None

    return op


def succeed(job: dict[str, Any], result: dict[str, Any]) -> Any:
    """Store the result exactly once: only the attempt that is still running may."""

    def op(conn: sqlite3.Connection) -> bool:
        row = _row(conn, job["id"])
        if row["state"] != JobState.RUNNING or row["attempts"] != job["attempts"]:
            return False  # cancelled meanwhile, or a stale attempt
        after = _transition(conn, row, JobEvent.SUCCEED, result=_as_json(result))
        _report_if_final(conn, after, {"result": result})
        return True

    return op


def fail(job: dict[str, Any], error: dict[str, Any], *, transient: bool) -> Any:
    def op(conn: sqlite3.Connection) -> str | None:
        row = _row(conn, job["id"])
        if row["state"] != JobState.RUNNING or row["attempts"] != job["attempts"]:
            return None
        if not transient:
            event = JobEvent.FAIL_PERMANENT
        else:
            event = failure_event(row["attempts"], row["max_attempts"])
        extra: dict[str, Any] = {"error": _as_json(error)}
        if event == JobEvent.RETRY:
            extra["not_before"] = time.time() + backoff_s(row["attempts"])
        after = _transition(conn, row, event, **extra)
        _report_if_final(conn, after, {"error": error})
        return str(after["state"])

    return op


def recover(conn: sqlite3.Connection) -> int:
    """At startup: jobs left running by a dead agent run again (their attempt counted)."""
    rows = conn.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall()
    error = {"code": "interrupted", "message": "the agent stopped while the job ran"}
    for row in rows:
        event = JobEvent.RECOVER if row["attempts"] < row["max_attempts"] else JobEvent.GIVE_UP
        after = _transition(conn, row, event, error=json.dumps(error))
        _report_if_final(conn, after, {"error": error})
    return len(rows)


#: Jobs from the fleet carry this prefix before the job message's id in their idempotency
#: key: their result names that id, which is how the control plane knows its job.
FLEET_KEY_PREFIX = "fleet:"


def reported_job_id(job_id: str, idempotency_key: str | None) -> str:
    """The id a job's result reports: the fleet's message id for a fleet job, else ours."""
    if idempotency_key is not None and idempotency_key.startswith(FLEET_KEY_PREFIX):
        return idempotency_key.removeprefix(FLEET_KEY_PREFIX)
    return job_id


def refused_remote_job(message_id: str, metadata: Any, exc: EdgelmError) -> Any:
    """A fleet job that cannot even be queued (its request is wrong, the outbox is full)
    still tells the control plane how it ended: failed, with the reason."""

    def op(conn: sqlite3.Connection) -> None:
        body = {
            "job_id": message_id,
            "state": "failed",
            "metadata": metadata,
            "result": None,
            "error": {"code": exc.code or "refused", "message": str(exc)},
        }
        outbox.append(conn, MessageKind.RESULT, body)

    return op


def _metadata_or_none(raw: str | None) -> Any:
    try:
        return json.loads(raw or "null")
    except ValueError:  # a corrupt row still reports how it ended, without its metadata
        return None


def _report_if_final(conn: sqlite3.Connection, after: sqlite3.Row, outcome: dict[str, Any]) -> None:
    """Every upstream job tells headquarters how it ended, exactly once: with its result, or
    with the error that ended it (failed, dead, cancelled or expired). It is written in the
    transaction that makes the job final, so a crash cannot lose or repeat it."""
    if after["state"] in FINAL and after["report"] == "upstream":
        body = {
            "job_id": reported_job_id(after["id"], after["idempotency_key"]),
            "state": after["state"],
            "metadata": _metadata_or_none(after["metadata"]),
            "result": None,
            "error": None,
            **outcome,
        }
        # Its room was checked when the job was accepted: a result is never refused.
        outbox.append(conn, MessageKind.RESULT, body)


def prune(max_age_s: float, max_count: int) -> Any:
    """Forget finished jobs older than max_age_s, and all but the newest max_count of them."""

    def op(conn: sqlite3.Connection) -> int:
        final = ", ".join(f"'{s.value}'" for s in FINAL)
        removed = conn.execute(
            f"DELETE FROM jobs WHERE state IN ({final}) AND finished_at < ?",  # noqa: S608  # constant list
            (time.time() - max_age_s,),
        ).rowcount
        removed += conn.execute(
            f"DELETE FROM jobs WHERE state IN ({final}) AND seq NOT IN (SELECT seq FROM jobs "  # noqa: S608  # constant list
            f"WHERE state IN ({final}) ORDER BY finished_at DESC, seq DESC LIMIT ?)",
            (max_count,),
        ).rowcount
        return removed

    return op
