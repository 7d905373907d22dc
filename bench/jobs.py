"""How fast can jobs be enqueued durably: the queue layer and HTTP, next to raw SQLite?

The project budgets it: durable enqueue of at least 5,000 jobs/s in the queue layer and 500 jobs/s
through HTTP. "Durable" is the agent's own setting (``edgelm_agent.jobs.database``): SQLite in
WAL mode with ``synchronous=FULL``, so every commit syncs the write-ahead log to disk before it
returns, and a job counts as accepted only once its commit has returned. The queue pays for that
with group commit: operations that arrive while a commit is in progress share the next
transaction and its one sync. This script measures, side by side in one run:

* **raw sqlite3, commit per row**: ``BEGIN IMMEDIATE; INSERT; COMMIT`` for each job, one at a
  time, in a fresh database with the agent's own schema (its migrations) and the same pragmas.
  The baseline: what one sync per job costs on this disk.
* **raw sqlite3, one transaction**: the same inserts in one transaction with one commit, an upper
  bound that no durable per-job acknowledgement can reach.
* **queue layer, sequential**: ``Database.run_sync(store.submit(spec))``, waiting for each job
  before the next; every job pays its own commit, as in the raw loop, plus the queue's own work.
* **queue layer, N outstanding**: all N ``Database.submit`` futures at once, then waiting for all;
  the writer thread commits them in groups of up to ``MAX_GROUP``.
* **queue layer, asyncio**: ``await Database.run(...)`` from C coroutines at a time, the way the
  HTTP handlers call it, at the same concurrency as the HTTP clients.
* **agent over loopback HTTP and over its Unix socket**: a real ``edgelm agent run`` subprocess
  (no model: jobs are accepted without one and stay queued), and an aiohttp client in this
  process posting N jobs to ``POST /v1/jobs`` over C kept-alive connections; a job counts when
  its 202 arrives.

Every contender enqueues the same job (a small chat request, validated by the agent's own
``parse_job``) into a fresh database in a temporary directory on the same filesystem, so all
start from an empty queue (the cost of a submission grows with the queue, see below). Each agent
run starts a fresh agent with a fresh state directory, waits until it is ready, opens the
connections with C untimed jobs, and then times N. The contenders run ``--repeats`` times in a
freshly shuffled order each repetition, after one untimed warm-up run each, and medians are
compared: on a small, shared machine ratios measured side by side mean more than any one
absolute number. After every run the database is opened again and must hold exactly the jobs
that were acknowledged, all queued.

Also reported: jobs per commit (from one extra run of each queue-layer contender with a trace
callback that counts ``COMMIT`` statements on the writer's connection; the timed runs have no
trace), CPU time per job (this process, plus the agent's for HTTP), the disk's median
``fdatasync`` time for a 4 KiB append, and what one submission, one ``claim`` and one
``next_due`` cost on the writer thread with 0, N and 4N jobs already queued (inside one
transaction, rolled back, so no sync is counted).

The result is printed as a table and written to ``docs/benchmarks.md`` between
``<!-- jobs:begin -->`` and ``<!-- jobs:end -->`` (``--no-write`` only prints; ``--json``
prints the raw results as JSON on stdout). Every process and temporary directory it creates is
removed on the way out, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from rich.table import Table

from edgelm_agent.jobs import store
from edgelm_agent.jobs.database import MAX_GROUP, Database, migrate
from edgelm_agent.jobs.submission import parse_job

if TYPE_CHECKING or __package__:  # mypy, or `python -m bench.jobs`, from the repository's root
    from bench import harness
else:  # `python bench/jobs.py` puts this folder on sys.path
    import harness

SECTION = "jobs"
SECTION_BEGIN, SECTION_END = harness.markers(SECTION)
REPRODUCE = "`python bench/jobs.py`"

# The project's budgets for durable enqueue.
QUEUE_TARGET_JOBS_PER_S = 5000.0
HTTP_TARGET_JOBS_PER_S = 500.0

#: The job every contender enqueues, as a client would POST it.
JOB_BODY: dict[str, Any] = {
    "request": {
        "model": "bench",
        "messages": [{"role": "user", "content": "Summarize the day's sensor log."}],
        "max_tokens": 64,
    },
    "metadata": {"source": "bench/jobs.py"},
}

WARM_UP_JOBS = 200
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0
FSYNC_SAMPLES = 200
DEPTH_SUBMITS = 200
DEPTH_CLAIMS = 10
DEPTH_NEXT_DUE = 20

# Contender keys, in table order, with their labels.
RAW_PER_COMMIT = "raw_commit_per_row"
RAW_ONE_TXN = "raw_one_transaction"
QUEUE_SEQUENTIAL = "queue_sequential"
QUEUE_OUTSTANDING = "queue_all_outstanding"
QUEUE_ASYNCIO = "queue_asyncio"
HTTP_TCP = "agent_http"
HTTP_UNIX = "agent_unix"
KEYS = (
    RAW_PER_COMMIT,
    RAW_ONE_TXN,
    QUEUE_SEQUENTIAL,
    QUEUE_OUTSTANDING,
    QUEUE_ASYNCIO,
    HTTP_TCP,
    HTTP_UNIX,
)
QUEUE_KEYS = (QUEUE_SEQUENTIAL, QUEUE_OUTSTANDING, QUEUE_ASYNCIO)
HTTP_KEYS = (HTTP_TCP, HTTP_UNIX)
#: The contenders the project's targets apply to, with their target.
TARGETS = {
    QUEUE_OUTSTANDING: QUEUE_TARGET_JOBS_PER_S,
    QUEUE_ASYNCIO: QUEUE_TARGET_JOBS_PER_S,
    HTTP_TCP: HTTP_TARGET_JOBS_PER_S,
    HTTP_UNIX: HTTP_TARGET_JOBS_PER_S,
}


def labels(settings: Settings) -> dict[str, str]:
    c = settings.concurrency
    return {
        RAW_PER_COMMIT: "raw sqlite3, INSERT + COMMIT per row",
        RAW_ONE_TXN: "raw sqlite3, one transaction for all rows",
        QUEUE_SEQUENTIAL: "queue layer, sequential (run_sync)",
        QUEUE_OUTSTANDING: f"queue layer, all {settings.jobs} outstanding (submit)",
        QUEUE_ASYNCIO: f"queue layer, asyncio, {c} at a time (run)",
        HTTP_TCP: f"agent, loopback HTTP, {c} connections",
        HTTP_UNIX: f"agent, Unix socket, {c} connections",
    }


# --------------------------------------------------------------------------- settings, samples


@dataclass(frozen=True)
class Settings:
    jobs: int
    repeats: int
    concurrency: int
    seed: int


@dataclass(frozen=True)
class Sample:
    """One timed run: ``jobs`` durably enqueued in ``seconds``."""

    jobs: int
    seconds: float
    #: CPU seconds this process (and, over HTTP, the agent) spent in the timed window.
    cpu_s: float
    #: Of which the agent process's share (HTTP only).
    agent_cpu_s: float | None = None

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds


def job_spec() -> store.JobSpec:
    """The job, through the same validation as ``POST /v1/jobs``."""
    return parse_job(json.loads(json.dumps(JOB_BODY)), time.time())


def check_database(path: Path, expected: int) -> None:
    """The run's database must hold exactly the acknowledged jobs, all queued."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        counts = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    finally:
        conn.close()
    if counts != {"queued": expected}:
        raise RuntimeError(f"{path}: expected {expected} queued jobs, found {counts}")


# --------------------------------------------------------------------------- raw sqlite3


def raw_connection(path: Path) -> sqlite3.Connection:
    """The agent's durability settings, set here explicitly, and its schema."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    migrate(conn)
    return conn


RAW_INSERT = (
    "INSERT INTO jobs (id, state, kind, priority, request, idempotency_key, metadata, "
    "report, attempts, max_attempts, created_at, updated_at, not_before, deadline, "
    "fingerprint, model) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, 0, ?, ?, ?)"
)


def raw_row(spec: store.JobSpec) -> tuple[Any, ...]:
    """The values ``store.submit`` inserts, built the same way (id, JSON, timestamps,
    idempotency fingerprint)."""
    now = time.time()
    return (
        "job-" + secrets.token_hex(12),
        spec.kind,
        spec.priority,
        json.dumps(spec.request),
        spec.idempotency_key,
        json.dumps(spec.metadata) if spec.metadata is not None else None,
        spec.report,
        spec.max_attempts,
        now,
        now,
        spec.deadline,
        spec.fingerprint(),
        spec.model,
    )


def run_raw(workdir: Path, jobs: int, *, one_transaction: bool) -> Sample:
    path = workdir / "raw.db"
    spec = job_spec()
    conn = raw_connection(path)
    try:
        cpu, started = time.process_time(), time.perf_counter()
        if one_transaction:
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(jobs):
                conn.execute(RAW_INSERT, raw_row(spec))
            conn.execute("COMMIT")
        else:
            for _ in range(jobs):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(RAW_INSERT, raw_row(spec))
                conn.execute("COMMIT")
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        conn.close()
    check_database(path, jobs)
    return Sample(jobs, elapsed, cpu)


# --------------------------------------------------------------------------- the queue layer


def synchronous_setting(db: Database) -> int:
    """PRAGMA synchronous on the writer's own connection (2 is FULL)."""
    return int(db.run_sync(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]))


def journal_mode(db: Database) -> str:
    return str(db.run_sync(lambda conn: conn.execute("PRAGMA journal_mode").fetchone()[0]))


class CommitCounter:
    """Counts COMMIT statements on the writer's connection, once installed by an operation."""

    def __init__(self) -> None:
        self.commits = 0

    def __call__(self, statement: str) -> None:
        if statement.strip().upper() == "COMMIT":
            self.commits += 1

    def install(self, db: Database) -> None:
        db.run_sync(lambda conn: conn.set_trace_callback(self))
        self.commits = 0


async def submit_from_coroutines(db: Database, spec: store.JobSpec, jobs: int, width: int) -> None:
    remaining = jobs

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await db.run(store.submit(spec))

    await asyncio.gather(*(client() for _ in range(width)))


def run_queue(
    workdir: Path, key: str, jobs: int, concurrency: int, counter: CommitCounter | None = None
) -> Sample:
    path = workdir / "queue.db"
    spec = job_spec()
    db = Database(path)
    try:
        if counter is not None:
            counter.install(db)
        cpu, started = time.process_time(), time.perf_counter()
        if key == QUEUE_SEQUENTIAL:
            for _ in range(jobs):
                db.run_sync(store.submit(spec))
        elif key == QUEUE_OUTSTANDING:
            futures = [db.submit(store.submit(spec)) for _ in range(jobs)]
            for future in futures:
                future.result()
        elif key == QUEUE_ASYNCIO:
            asyncio.run(submit_from_coroutines(db, spec, jobs, concurrency))
        else:
            raise ValueError(key)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        db.close()
    check_database(path, jobs)
    return Sample(jobs, elapsed, cpu)


# --------------------------------------------------------------------------- the agent


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class AgentProcess(harness.AgentProcess):
    """``edgelm agent run`` without a model; :meth:`stop` is safe to call at any time."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("the agent", workdir)

    @property
    def database(self) -> Path:
        return self.state_dir / "agent.db"

    def is_ready(self) -> bool:
        """Listening, and past model start-up, so its job worker runs."""
        return '"agent_ready"' in self.log_text()

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)


@contextlib.contextmanager
def running_agent(workdir: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(workdir)
    try:
        yield agent
    finally:
        agent.stop()


async def wait_ready(agent: AgentProcess, session: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        agent.check_alive()
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(f"{base}/healthz") as response:
                if response.status == 200 and agent.is_ready():
                    return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the agent is not ready after {READY_TIMEOUT_S:.0f} s:\n{agent.log_tail()}")


async def post_jobs(session: aiohttp.ClientSession, url: str, jobs: int, width: int) -> None:
    """``jobs`` POSTs from ``width`` clients; each must be answered 202 with a queued job."""
    remaining = jobs
    payload = json.dumps(JOB_BODY).encode()
    headers = {"Content-Type": "application/json"}

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=payload, headers=headers) as response:
                body = await response.read()
                if response.status != 202:
                    raise RuntimeError(f"POST /v1/jobs: HTTP {response.status}: {body[:300]!r}")
                if json.loads(body)["state"] != "queued":
                    raise RuntimeError(f"POST /v1/jobs: not queued: {body[:300]!r}")

    await asyncio.gather(*(client() for _ in range(width)))


async def http_session_run(agent: AgentProcess, key: str, jobs: int, width: int) -> Sample:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector: aiohttp.BaseConnector
    if key == HTTP_UNIX:
        connector, base = (
            aiohttp.UnixConnector(path=str(agent.socket), limit=width),
            "http://localhost",
        )
    else:
        connector, base = aiohttp.TCPConnector(limit=width), f"http://127.0.0.1:{agent.port}"
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await wait_ready(agent, session, base)
        url = f"{base}/v1/jobs"
        await post_jobs(session, url, width, width)  # opens the connections, untimed
        agent_cpu, cpu = agent.cpu_s(), time.process_time()
        started = time.perf_counter()
        await post_jobs(session, url, jobs, width)
        elapsed = time.perf_counter() - started
        cpu, agent_cpu = time.process_time() - cpu, agent.cpu_s() - agent_cpu
    return Sample(jobs, elapsed, cpu + agent_cpu, agent_cpu)


def run_http(workdir: Path, key: str, jobs: int, width: int) -> Sample:
    with running_agent(workdir) as agent:
        sample = asyncio.run(http_session_run(agent, key, jobs, width))
    check_database(agent.database, jobs + width)
    return sample


# --------------------------------------------------------------------------- the schedule


def run_contender(base: Path, key: str, jobs: int, settings: Settings) -> Sample:
    """One run in its own fresh directory, removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    try:
        if key == RAW_PER_COMMIT:
            return run_raw(workdir, jobs, one_transaction=False)
        if key == RAW_ONE_TXN:
            return run_raw(workdir, jobs, one_transaction=True)
        if key in QUEUE_KEYS:
            return run_queue(workdir, key, jobs, settings.concurrency)
        return run_http(workdir, key, jobs, settings.concurrency)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_rounds(
    base: Path, settings: Settings, rng: random.Random, progress: harness.Progress
) -> dict[str, list[Sample]]:
    """Warm up each contender once, then ``repeats`` rounds in a freshly shuffled order."""
    for key in KEYS:
        warm = run_contender(base, key, min(WARM_UP_JOBS, settings.jobs), settings)
        progress(f"warm-up {key}: {warm.jobs_per_s:.0f} jobs/s")
    samples: dict[str, list[Sample]] = {key: [] for key in KEYS}
    order = list(KEYS)
    for repeat in range(1, settings.repeats + 1):
        rng.shuffle(order)
        for key in order:
            samples[key].append(run_contender(base, key, settings.jobs, settings))
        progress(
            f"repetition {repeat}/{settings.repeats}: "
            + ", ".join(f"{key} {samples[key][-1].jobs_per_s:.0f}" for key in KEYS)
        )
    return samples


def jobs_per_commit(base: Path, settings: Settings) -> dict[str, float]:
    """One traced run of each queue-layer contender: jobs per COMMIT on the writer thread."""
    result: dict[str, float] = {RAW_PER_COMMIT: 1.0, RAW_ONE_TXN: float(settings.jobs)}
    for key in QUEUE_KEYS:
        workdir = Path(tempfile.mkdtemp(prefix="trace-", dir=base))
        try:
            counter = CommitCounter()
            run_queue(workdir, key, settings.jobs, settings.concurrency, counter)
            result[key] = settings.jobs / max(1, counter.commits)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


@dataclass(frozen=True)
class Durability:
    journal_mode: str
    synchronous: int
    agent_journal_mode: str

    @property
    def synchronous_name(self) -> str:
        return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(self.synchronous, "?")


def check_durability(base: Path) -> Durability:
    """What the queue layer really runs with (the agent's journal mode is read back later)."""
    workdir = Path(tempfile.mkdtemp(prefix="pragma-", dir=base))
    try:
        db = Database(workdir / "queue.db")
        try:
            return Durability(journal_mode(db), synchronous_setting(db), agent_journal_mode="?")
        finally:
            db.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def agent_journal_mode(base: Path) -> str:
    """Start an agent, stop it, and read its database's (persistent) journal mode."""
    workdir = Path(tempfile.mkdtemp(prefix="agent-", dir=base))
    try:
        with running_agent(workdir) as agent:
            asyncio.run(http_session_run(agent, HTTP_UNIX, 1, 1))
        conn = sqlite3.connect(f"file:{agent.database}?mode=ro", uri=True)
        try:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
        finally:
            conn.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- cost vs queue depth


@dataclass(frozen=True)
class DepthCost:
    """Writer-thread time of one operation with ``depth`` jobs queued (no sync included)."""

    depth: int
    submit_us: float
    #: The separate read of the new job's position in the queue, which the agent does on its
    #: WAL reader connection, off the writer thread.
    position_us: float
    claim_us: float
    next_due_us: float


def time_ops(conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], Any], n: int) -> float:
    """Median microseconds of ``op``, each in a transaction that is rolled back."""
    times = []
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        started = time.perf_counter()
        op(conn)
        times.append((time.perf_counter() - started) * 1e6)
        conn.execute("ROLLBACK")
    return statistics.median(times)


def time_submits(conn: sqlite3.Connection, spec: store.JobSpec, n: int) -> tuple[float, float]:
    """Median microseconds of ``store.submit``, and of the position read that follows it."""
    submits, positions = [], []
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        started = time.perf_counter()
        job, _ = store.submit(spec)(conn)
        submits.append((time.perf_counter() - started) * 1e6)
        started = time.perf_counter()
        store.position(job["id"])(conn)
        positions.append((time.perf_counter() - started) * 1e6)
        conn.execute("ROLLBACK")
    return statistics.median(submits), statistics.median(positions)


def depth_costs(base: Path, depths: Sequence[int]) -> list[DepthCost]:
    workdir = Path(tempfile.mkdtemp(prefix="depth-", dir=base))
    spec = job_spec()
    results = []
    try:
        conn = raw_connection(workdir / "depth.db")
        conn.row_factory = sqlite3.Row  # as the agent's connection has
        try:
            queued = 0
            for depth in sorted(depths):
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(RAW_INSERT, (raw_row(spec) for _ in range(depth - queued)))
                conn.execute("COMMIT")
                queued = depth
                submit_us, position_us = time_submits(conn, spec, DEPTH_SUBMITS)
                results.append(
                    DepthCost(
                        depth=depth,
                        submit_us=submit_us,
                        position_us=position_us,
                        claim_us=time_ops(conn, store.claim(time.time(), spec.model), DEPTH_CLAIMS),
                        next_due_us=time_ops(conn, store.next_due(spec.model), DEPTH_NEXT_DUE),
                    )
                )
        finally:
            conn.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


# --------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class Disk:
    device: str
    fs_type: str
    same_filesystem_as_repo: bool
    fdatasync_ms: float


def mount_of(path: Path) -> tuple[str, str]:
    """The device and filesystem type of the mount holding ``path`` (longest prefix)."""
    best = ("unknown", "unknown", "")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, point, fs_type, *_ = line.split()
            if str(path).startswith(point) and len(point) > len(best[2]):
                best = (device, fs_type, point)
    return best[0], best[1]


def fdatasync_ms(base: Path) -> float:
    """Median time of a 4 KiB append plus fdatasync, what a WAL commit must wait for."""
    path = base / "fsync-probe"
    block = os.urandom(4096)
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(FSYNC_SAMPLES):
            started = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return statistics.median(times) * 1000


def describe_disk(base: Path) -> Disk:
    device, fs_type = mount_of(base.resolve())
    return Disk(
        device=device,
        fs_type=fs_type,
        same_filesystem_as_repo=os.stat(base).st_dev == os.stat(harness.REPO).st_dev,
        fdatasync_ms=fdatasync_ms(base),
    )


@dataclass(frozen=True)
class Environment(harness.Environment):
    python: str
    sqlite: str
    aiohttp: str


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    runs: int
    jobs_per_s: float
    jobs_per_s_p25: float
    jobs_per_s_p75: float
    ratio_vs_raw_per_commit: float
    #: Median over repetitions of this repetition's rate over the raw per-commit loop's.
    paired_ratio_vs_raw_per_commit: float
    ratio_vs_raw_one_transaction: float
    jobs_per_commit: float | None
    cpu_us_per_job: float
    agent_cpu_us_per_job: float | None


def summarize(
    samples: dict[str, list[Sample]], per_commit: dict[str, float], settings: Settings
) -> list[Row]:
    def rates(key: str) -> list[float]:
        return [s.jobs_per_s for s in samples[key]]

    raw, bound = statistics.median(rates(RAW_PER_COMMIT)), statistics.median(rates(RAW_ONE_TXN))
    names = labels(settings)
    rows = []
    for key in KEYS:
        mine = rates(key)
        median = statistics.median(mine)
        p25, p75 = harness.quartiles(mine)
        agent_cpu = [s.agent_cpu_s for s in samples[key] if s.agent_cpu_s is not None]
        rows.append(
            Row(
                key=key,
                label=names[key],
                runs=len(mine),
                jobs_per_s=median,
                jobs_per_s_p25=p25,
                jobs_per_s_p75=p75,
                ratio_vs_raw_per_commit=median / raw,
                paired_ratio_vs_raw_per_commit=harness.paired_ratio(mine, rates(RAW_PER_COMMIT)),
                ratio_vs_raw_one_transaction=median / bound,
                jobs_per_commit=per_commit.get(key),
                cpu_us_per_job=statistics.median(s.cpu_s / s.jobs for s in samples[key]) * 1e6,
                agent_cpu_us_per_job=(
                    statistics.median(agent_cpu) / settings.jobs * 1e6 if agent_cpu else None
                ),
            )
        )
    return rows


@dataclass(frozen=True)
class Verdict:
    label: str
    jobs_per_s: float
    target: float
    p25: float
    p75: float

    @property
    def met(self) -> bool:
        return self.jobs_per_s >= self.target

    def describe(self) -> str:
        outcome = (
            f"met, {self.jobs_per_s / self.target:.1f}x the target"
            if self.met
            else f"**missed**, {self.jobs_per_s / self.target:.2f}x the target"
        )
        return (
            f"{self.label}: {self.jobs_per_s:,.0f} jobs/s (p25..p75 {self.p25:,.0f}.."
            f"{self.p75:,.0f}; target >= {self.target:,.0f}): {outcome}."
        )


def verdicts(rows: Sequence[Row]) -> list[Verdict]:
    return [
        Verdict(r.label, r.jobs_per_s, TARGETS[r.key], r.jobs_per_s_p25, r.jobs_per_s_p75)
        for r in rows
        if r.key in TARGETS
    ]


@dataclass(frozen=True)
class Report:
    settings: Settings
    environment: Environment
    disk: Disk
    durability: Durability
    rows: list[Row]
    depths: list[DepthCost]
    command: str
    samples: dict[str, list[Sample]] = field(repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "environment": asdict(self.environment),
            "disk": asdict(self.disk),
            "durability": {**asdict(self.durability), "synchronous_name": self.sync_name},
            "contenders": {row.key: asdict(row) for row in self.rows},
            "samples": {
                key: [{**asdict(s), "jobs_per_s": s.jobs_per_s} for s in runs]
                for key, runs in self.samples.items()
            },
            "targets": [{**asdict(v), "met": v.met} for v in verdicts(self.rows)],
            "cost_vs_queue_depth": [asdict(d) for d in self.depths],
            "command": self.command,
        }

    @property
    def sync_name(self) -> str:
        return self.durability.synchronous_name


# --------------------------------------------------------------------------- output


HEADINGS = (
    "contender",
    "median jobs/s",
    "jobs/s p25..p75",
    "ratio to raw commit per row",
    "ratio to raw one transaction",
    "jobs per commit",
    "CPU µs per job",
)


def table_cells(row: Row) -> list[str]:
    per_commit = "n/a" if row.jobs_per_commit is None else f"{row.jobs_per_commit:,.1f}"
    cpu = f"{row.cpu_us_per_job:,.0f}"
    if row.agent_cpu_us_per_job is not None:
        cpu += f" (agent {row.agent_cpu_us_per_job:,.0f})"
    return [
        row.label,
        f"{row.jobs_per_s:,.0f}",
        f"{row.jobs_per_s_p25:,.0f}..{row.jobs_per_s_p75:,.0f}",
        f"{row.ratio_vs_raw_per_commit:.2f} ({row.paired_ratio_vs_raw_per_commit:.2f})",
        f"{row.ratio_vs_raw_one_transaction:.3f}",
        per_commit,
        cpu,
    ]


def rich_table(rows: Sequence[Row]) -> Table:
    return harness.rich_table(
        "Durable enqueue: jobs/s (WAL, synchronous=FULL)",
        HEADINGS,
        [table_cells(row) for row in rows],
    )


def depth_table_rich(depths: Sequence[DepthCost]) -> Table:
    return harness.rich_table(
        "Writer-thread time per operation vs jobs already queued (no sync)",
        DEPTH_HEADINGS,
        [depth_cells(cost) for cost in depths],
        left=0,
    )


DEPTH_HEADINGS = (
    "jobs queued",
    "store.submit µs",
    "position read µs (reader)",
    "submits/s ceiling",
    "store.claim µs",
    "store.next_due µs",
)


def depth_cells(cost: DepthCost) -> list[str]:
    return [
        f"{cost.depth:,}",
        f"{cost.submit_us:,.0f}",
        f"{cost.position_us:,.0f}",
        f"{1e6 / cost.submit_us:,.0f}",
        f"{cost.claim_us:,.0f}",
        f"{cost.next_due_us:,.0f}",
    ]


def run_facts(report: Report) -> list[str]:
    s, env, disk, dur = report.settings, report.environment, report.disk, report.durability
    same = (
        "the same filesystem as the repository"
        if disk.same_filesystem_as_repo
        else ("**not** the repository's filesystem")
    )
    return [
        *harness.machine_facts(env),
        f"- Disk: temporary directories under /tmp on `{disk.device}` ({disk.fs_type}), {same}; "
        f"a 4 KiB append + `fdatasync` takes {disk.fdatasync_ms:.2f} ms (median of "
        f"{FSYNC_SAMPLES})",
        f"- Durability: `journal_mode={dur.journal_mode}`, `synchronous={dur.synchronous_name}` "
        f"(read back from the queue layer's writer connection; the agent's database: "
        f"`journal_mode={dur.agent_journal_mode}`); the raw loops set the same pragmas",
        f"- Jobs per run: {s.jobs:,}; concurrency {s.concurrency} (asyncio coroutines and HTTP "
        f"connections); group size cap `MAX_GROUP` = {MAX_GROUP}",
        f"- Repetitions: {s.repeats}, order shuffled each repetition, after one warm-up run of "
        f"{min(WARM_UP_JOBS, s.jobs)} jobs each; every run into a fresh, empty database",
        f"- Python {env.python}, SQLite {env.sqlite}, aiohttp {env.aiohttp}",
        f"- This run: `{report.command}`",
        f"- Reproduce: {REPRODUCE}",
    ]


def depth_sentence(report: Report) -> str:
    first, *_, last = report.depths
    at_n = next((d for d in report.depths if d.depth == report.settings.jobs), last)
    growth = (last.submit_us - first.submit_us) / max(1, last.depth - first.depth) * 1000
    ceiling = 1e6 / at_n.submit_us
    versus = "below" if ceiling < QUEUE_TARGET_JOBS_PER_S else "above"
    return (
        f"A submission costs the writer thread {first.submit_us:,.0f} µs into an empty queue, "
        f"{at_n.submit_us:,.0f} µs with {at_n.depth:,} jobs queued and {last.submit_us:,.0f} µs "
        f"with {last.depth:,}: about {growth:,.0f} µs more per 1,000 queued jobs, so with "
        f"{at_n.depth:,} jobs queued submissions alone would cap the writer thread at "
        f"{ceiling:,.0f} jobs/s, {versus} the budget's {QUEUE_TARGET_JOBS_PER_S:,.0f}, before any "
        f"sync. The queue position returned with each submission is a `count(*)` over the "
        f"queued jobs ahead ({at_n.position_us:,.0f} µs at {at_n.depth:,} queued, "
        f"{last.position_us:,.0f} µs at {last.depth:,}); the agent reads it on its WAL reader "
        f"connection, so it costs CPU but never holds the writer. The runs in the table above "
        f"start "
        f"empty and end with {report.settings.jobs:,} queued, so a longer run measures a lower "
        f"rate. The worker's operations: `store.claim` takes "
        f"{last.claim_us / 1000:,.1f} ms with {last.depth:,} queued and `store.next_due` "
        f"{last.next_due_us / 1000:,.1f} ms; an idle worker (as here, with no model loaded) "
        f"runs `next_due` after every wake-up, and every accepted job wakes it."
    )


def reading(report: Report) -> str:
    """What the main table says about where the time goes."""
    by_key = {row.key: row for row in report.rows}
    raw, grouped = by_key[RAW_PER_COMMIT], by_key[QUEUE_OUTSTANDING]
    at_n = next((d for d in report.depths if d.depth == report.settings.jobs), report.depths[-1])
    per_commit = grouped.jobs_per_commit or 1.0
    sync_us = report.disk.fdatasync_ms * 1000
    return (
        f"A sync takes {report.disk.fdatasync_ms:.2f} ms on this disk, and the raw loop commits "
        f"{raw.jobs_per_s:,.0f} rows/s with one sync each. With all jobs outstanding, the queue "
        f"layer shares one sync among {per_commit:,.0f} jobs on average, about "
        f"{sync_us / per_commit:,.1f} µs of sync per job, and reaches "
        f"{grouped.ratio_vs_raw_per_commit:.2f}x the raw loop, spending "
        f"{grouped.cpu_us_per_job:,.0f} µs of CPU per job against the raw loop's "
        f"{raw.cpu_us_per_job:,.0f} µs: its limit here is CPU on the writer thread, not syncing. "
        f"The queue position is read on a separate connection, off the writer thread "
        f"({at_n.position_us:,.0f} µs per job at the end of a run; next section). Where a sync "
        f"takes milliseconds, the raw loop's "
        f"rate falls with it, while group commit keeps the queue's sync cost per job small."
    )


def markdown_section(report: Report) -> str:
    rows = report.rows
    parts = [
        SECTION_BEGIN,
        "## Durable job enqueue (`bench/jobs.py`)",
        "",
        "Jobs per second accepted durably by the job queue (`Database` + `store.submit`, "
        "sequentially, with all jobs outstanding at once, and from asyncio coroutines) and by a "
        "real agent's `POST /v1/jobs` over loopback HTTP and over its Unix socket, next to raw "
        "`sqlite3` inserts into the same schema with the same durability: one commit per row "
        "(the baseline) and one transaction for all rows (an upper bound). A job counts once "
        "its commit returned (its future resolved, or its 202 arrived). Medians over "
        "repetitions in one run; ratios are what to read, absolute numbers depend on the "
        "machine, its disk and its load. The script's docstring explains the method.",
        "",
        *run_facts(report),
        "",
        *harness.caution(report.environment),
        harness.markdown_table(HEADINGS, [table_cells(r) for r in rows]),
        "",
        "Ratios to the raw commit-per-row loop are of medians, with the median of "
        "per-repetition ratios in parentheses. Jobs per commit come from one extra traced run "
        "of each queue-layer contender (the agent's commits are not traced). CPU is this "
        "process's time per job, plus the agent process's for HTTP (its share in parentheses); "
        "the HTTP client runs in this process, on the same two cores as the agent.",
        "",
        "Targets (the project's budgets: durable enqueue of at least "
        f"{QUEUE_TARGET_JOBS_PER_S:,.0f} jobs/s in the queue layer and "
        f"{HTTP_TARGET_JOBS_PER_S:,.0f} jobs/s through HTTP; every job committed with "
        f"`journal_mode={report.durability.journal_mode}`, "
        f"`synchronous={report.sync_name}` before it counts):",
        "",
        *(f"- {v.describe()}" for v in verdicts(rows)),
        "",
        reading(report),
        "",
        "### Cost of one operation vs the queue's depth",
        "",
        "Median writer-thread time of one operation on a database already holding the given "
        "number of queued jobs, each in a transaction that is rolled back, so no sync is "
        "included; the ceiling is what the writer thread could submit per second at that "
        "depth if syncs were free.",
        "",
        harness.markdown_table(DEPTH_HEADINGS, [depth_cells(d) for d in report.depths]),
        "",
        depth_sentence(report),
        SECTION_END,
    ]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- orchestration


def measure(settings: Settings, command: str, progress: harness.Progress) -> Report:
    start = harness.RunStart.now()
    rng = random.Random(settings.seed)
    with harness.temp_dir("edgelm-bench-jobs-", short=True) as base:
        disk = describe_disk(base)
        progress(f"fdatasync of 4 KiB: {disk.fdatasync_ms:.2f} ms")
        durability = check_durability(base)
        durability = Durability(
            durability.journal_mode, durability.synchronous, agent_journal_mode(base)
        )
        samples = run_rounds(base, settings, rng, progress)
        progress("traced runs: jobs per commit")
        per_commit = jobs_per_commit(base, settings)
        progress("cost vs queue depth")
        depths = depth_costs(base, (0, settings.jobs, 4 * settings.jobs))
    return Report(
        settings=settings,
        environment=Environment.measured(
            start,
            python=harness.python_version(),
            sqlite=sqlite3.sqlite_version,
            aiohttp=aiohttp.__version__,
        ),
        disk=disk,
        durability=durability,
        rows=summarize(samples, per_commit, settings),
        depths=depths,
        command=command,
        samples=samples,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser(
        "Durable enqueue throughput: the job queue layer and POST /v1/jobs (HTTP "
        "and Unix socket) against raw SQLite inserts with the same durability."
    )
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of every contender")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="coroutines / HTTP connections at a time"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the shuffled order")
    harness.add_output_options(parser, json_help="print the raw results as JSON on stdout")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.repeats < 1 or args.concurrency < 1:
        parser.error("need --jobs, --repeats and --concurrency >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        jobs=args.jobs, repeats=args.repeats, concurrency=args.concurrency, seed=args.seed
    )
    console, log = harness.start_run(args, width=160)
    try:
        report = measure(settings, harness.this_command(), lambda message: log.log(message))
    except KeyboardInterrupt:
        log.print("interrupted; agents stopped, temporary files removed")
        return 130
    console.print(rich_table(report.rows))
    for verdict in verdicts(report.rows):
        console.print(verdict.describe().replace("**", ""))
    console.print(depth_table_rich(report.depths))
    console.print(depth_sentence(report).replace("`", ""))
    harness.print_caution(console, report.environment)
    harness.publish(args, console, SECTION, report.as_json, lambda: markdown_section(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
