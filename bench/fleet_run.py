"""One measured rollout of ``bench/fleet.py``: a fresh fleet of N devices, from nothing to every
device running the tiny model.

:func:`measure_size` runs, in order, each step timed:

1. a Mosquitto of its own, ``fleet-init``, ``edgelm control run`` (SQLite), ``edgelm fleet
   models push`` of the tiny GGUF, and N enrollment bundles (*provision*);
2. the worker processes (:mod:`fleet_worker`), which enroll their devices (*enroll*) and start
   them, until the control plane lists all N online with the state they report (*connect*);
3. ``idle_window_s`` (10 s) of the idle fleet, for its idle CPU and memory;
4. ``POST /api/v1/rollouts`` (what ``edgelm fleet rollouts create`` sends) with ``--all`` and
   the wave plan, then ``GET /api/v1/rollouts/ID`` once a second until every device's row is
   ``succeeded``. The clock starts when the POST's answer has arrived (the rollout exists and
   its first wave has been notified). The end is read from the rollout's JSON: the latest
   ``updated_at`` of its rows, stamped by the control plane when it stored each device's
   success, so the polling interval adds nothing;
5. memory of every process with every device serving the model; then everything is stopped.

A step that does not get there is not forced: setup that makes no progress for
``setup_stall_s``, or a rollout not finished after ``rollout_timeout_s``, ends the size's run
as :class:`Unfinished`, with how far it got, and the report says so instead of a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm_provisioning.control_client import ControlClient

if TYPE_CHECKING or __package__:
    from bench import harness
    from bench.fleet_setup import (
        Broker,
        ControlSettings,
        Fleet,
        ProcReading,
        proc_reading,
    )
else:
    import harness
    from fleet_setup import Broker, ControlSettings, Fleet, ProcReading, proc_reading

WORKER = Path(__file__).resolve().parent / "fleet_worker.py"
POLL_S = 1.0
WORKER_STOP_TIMEOUT_S = 90.0
SETTLE_S = 30.0
PR_SET_PDEATHSIG = 1
#: Rollout states in which not every device will succeed: stop following it there.
ENDED_BADLY = ("failed", "aborted", "halted")


@dataclass(frozen=True)
class RunSettings:
    devices: int
    processes: int
    waves: str = "1%,rest"
    threads: int = 1
    telemetry_interval_s: float = 60.0
    executor_threads: int = 32
    #: Setup (enrollment, connecting) gives up after this long without any progress.
    setup_stall_s: float = 60.0
    rollout_timeout_s: float = 600.0
    #: The idle fleet's CPU is measured over this long, before the rollout.
    idle_window_s: float = 10.0
    control: ControlSettings = field(default_factory=ControlSettings)


@dataclass(frozen=True)
class Memory:
    """Resident memory of the processes at one moment, in kB."""

    workers_kb: tuple[int, ...]
    control_kb: int
    broker_kb: int

    @property
    def workers_total_kb(self) -> int:
        return sum(self.workers_kb)


@dataclass(frozen=True)
class Cpu:
    """CPU seconds each part used in a window, and the window's length."""

    wall_s: float
    workers_s: float
    control_s: float
    broker_s: float


@dataclass(frozen=True)
class SizeRun:
    """What one rollout to ``devices`` devices measured; times in seconds."""

    devices: int
    processes: int
    devices_per_process: tuple[int, ...]
    waves: tuple[int, ...]
    waves_requested: str
    provision_s: float
    enroll_s: float
    connect_s: float
    create_request_s: float
    #: From the POST's answer to the latest row's ``updated_at``, all rows ``succeeded``.
    rollout_s: float
    #: From the POST's answer to the first poll that saw every row ``succeeded``.
    rollout_observed_s: float
    #: Per wave: from its start to its verdict (the control plane's timestamps).
    wave_s: tuple[float, ...]
    #: Successes over time: seconds after the POST's answer when 50% / 90% had succeeded.
    half_s: float
    ninety_s: float
    memory_imported: Memory
    memory_idle: Memory
    memory_serving: Memory
    #: The last wave: when it started, and when its first device succeeded, in seconds after
    #: the POST's answer (the control plane's timestamps).
    last_wave_start_s: float
    last_wave_first_s: float
    cpu_idle: Cpu
    cpu_rollout: Cpu
    #: The rollout's state once every device had succeeded and its last wave was judged
    #: (or ``settle_s`` later).
    final_state: str

    @property
    def setup_s(self) -> float:
        return self.enroll_s + self.connect_s


@dataclass(frozen=True)
class Unfinished:
    """A size whose run stopped before every device succeeded: where, why, how far it got."""

    devices: int
    processes: int
    stage: str
    detail: str


class StageUnfinished(Exception):
    """A step gave up (see :class:`Unfinished`)."""

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail


# --------------------------------------------------------------------------- worker processes


@dataclass
class WorkerStatus:
    enrolled: int = 0
    started: int = 0
    connected: int = 0
    deaf: int = 0
    serving: int = 0
    imported: bool = False


class Worker:
    """One ``fleet_worker.py`` process and what it last reported."""

    def __init__(self, index: int, process: asyncio.subprocess.Process, devices: int) -> None:
        self.index = index
        self.process = process
        self.devices = devices
        self.status = WorkerStatus()
        self.changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                self._apply(json.loads(line))
            self.changed.set()

    def _apply(self, report: dict[str, Any]) -> None:
        event = report.get("event")
        if event == "imported":
            self.status.imported = True
        elif event == "enrolled":
            self.status.enrolled = int(report["count"])
        elif event == "started":
            self.status.started = int(report["count"])
        elif event == "status":
            self.status.connected = int(report["connected"])
            self.status.deaf = int(report["deaf"])
            self.status.serving = int(report["serving"])

    def check_alive(self, log: Path) -> None:
        if self.process.returncode is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"worker {self.index} exited {self.process.returncode}:\n{tail}")

    async def stop(self) -> None:
        """SIGTERM (each device stops as the daemon would), then SIGKILL after a while."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), WORKER_STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _die_with_parent() -> None:
    """In the child: SIGKILL it if the benchmark dies without stopping it (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def split(items: Sequence[dict[str, str]], parts: int) -> list[list[dict[str, str]]]:
    """``items`` in ``parts`` shares that differ by one at most."""
    return [list(items[i::parts]) for i in range(parts)]


@contextlib.asynccontextmanager
async def workers(
    work: Path, entries: Sequence[dict[str, str]], settings: RunSettings
) -> AsyncIterator[list[Worker]]:
    """Start the worker processes; stop every one of them on the way out, whatever happens."""
    started: list[Worker] = []
    logs = contextlib.ExitStack()
    try:
        for index, share in enumerate(split(entries, settings.processes)):
            spec = work / f"worker-{index}.json"
            spec.write_text(json.dumps(worker_spec(share, settings, work / f"worker-{index}.log")))
            stderr = logs.enter_context((work / f"worker-{index}.stderr").open("wb"))
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER),
                str(spec),
                cwd=harness.REPO,
                stdout=subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,  # Ctrl-C reaches the benchmark only, which stops us
                preexec_fn=_die_with_parent,  # only sets a signal: safe before exec
            )
            started.append(Worker(index, process, len(share)))
        yield started
    finally:
        await asyncio.gather(*(w.stop() for w in started), return_exceptions=True)
        logs.close()


def worker_spec(
    share: Sequence[dict[str, str]], settings: RunSettings, log: Path
) -> dict[str, Any]:
    return {
        "devices": list(share),
        "threads": settings.threads,
        "telemetry_interval_s": settings.telemetry_interval_s,
        "executor_threads": settings.executor_threads,
        "log": str(log),
    }


# --------------------------------------------------------------------------- readings


def memory(pool: Sequence[Worker], fleet: Fleet, broker: Broker) -> Memory:
    assert fleet.control is not None
    return Memory(
        workers_kb=tuple(proc_reading(w.process.pid).rss_kb for w in pool),
        control_kb=proc_reading(fleet.control.proc.pid).rss_kb,
        broker_kb=proc_reading(broker.proc.pid).rss_kb,
    )


@dataclass(frozen=True)
class CpuMark:
    at: float
    readings: tuple[ProcReading, ...]

    @classmethod
    def now(cls, pids: Sequence[int]) -> CpuMark:
        return cls(time.monotonic(), tuple(proc_reading(pid) for pid in pids))

    def until(self, later: CpuMark) -> Cpu:
        """CPU seconds since this mark: the workers', the control plane's, the broker's
        (the pids in that order: workers first, then control, then broker)."""
        used = [b.cpu_s - a.cpu_s for a, b in zip(self.readings, later.readings, strict=True)]
        return Cpu(
            wall_s=later.at - self.at,
            workers_s=sum(used[:-2]),
            control_s=used[-2],
            broker_s=used[-1],
        )


def pids(pool: Sequence[Worker], fleet: Fleet, broker: Broker) -> list[int]:
    assert fleet.control is not None
    return [*(w.process.pid for w in pool), fleet.control.proc.pid, broker.proc.pid]


# --------------------------------------------------------------------------- waiting


async def wait_for(
    condition: Callable[[], Any],
    stage: str,
    what: str,
    stall_s: float,
    check: Callable[[], None],
    interval_s: float = 0.2,
) -> float:
    """Wait until ``condition()`` (maybe a coroutine) is true; return the seconds it took.

    ``condition`` returns a false value that says how far it got (a tuple of counts, say)
    while it waits: when that value has not changed for ``stall_s``, the wait gives up with
    :class:`StageUnfinished`.
    """
    started = time.monotonic()
    last, last_change = None, started
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value is True:
            return time.monotonic() - started
        check()
        now = time.monotonic()
        if value != last:
            last, last_change = value, now
        elif now - last_change > stall_s:
            raise StageUnfinished(
                stage, f"no progress for {stall_s:.0f} s waiting for {what}: {value}"
            )
        await asyncio.sleep(interval_s)


async def online_devices(client: ControlClient) -> int:
    """Devices the control plane lists online with their reported state (the class the
    ``--all`` selector and the wave plan need)."""
    count, cursor = 0, None
    while True:
        query = [("limit", "1000"), ("presence", "online")]
        if cursor:
            query.append(("cursor", cursor))
        page = await client.get("/devices", query)
        count += sum(1 for d in page["data"] if d.get("hardware_class"))
        cursor = page.get("next_cursor")
        if not cursor:
            return count


class Reporter:
    """Progress lines on stderr, at most one per ``every_s`` unless the text changes."""

    def __init__(self, progress: harness.Progress, every_s: float = 5.0) -> None:
        self._progress = progress
        self._every_s = every_s
        self._last = ("", 0.0)

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if text != self._last[0] or now - self._last[1] >= self._every_s:
            self._progress(text)
            self._last = (text, now)


def totals(pool: Sequence[Worker]) -> WorkerStatus:
    total = WorkerStatus()
    for worker in pool:
        s = worker.status
        total.enrolled += s.enrolled
        total.started += s.started
        total.connected += s.connected
        total.deaf += s.deaf
        total.serving += s.serving
    return total


# --------------------------------------------------------------------------- the rollout


def epoch_s(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def success_times(rollout: dict[str, Any], since: float) -> list[float]:
    """Seconds after ``since`` (epoch) at which each succeeded row was stored, sorted."""
    return sorted(
        epoch_s(d["updated_at"]) - since for d in rollout["devices"] if d["state"] == "succeeded"
    )


def quantile_time(times: Sequence[float], share: float, total: int) -> float:
    """When ``share`` of ``total`` devices had succeeded."""
    index = max(0, min(len(times), int(total * share + 0.999999)) - 1)
    return times[index]


def wave_seconds(rollout: dict[str, Any]) -> tuple[float, ...]:
    return tuple(
        epoch_s(w["decided_at"]) - epoch_s(w["started_at"])
        for w in rollout["waves"]
        if w.get("decided_at") and w.get("started_at")
    )


@dataclass(frozen=True)
class RolloutOutcome:
    #: The rollout as shown when every device had succeeded (or when following it stopped).
    rollout: dict[str, Any]
    created_at: float  # epoch seconds when the POST's answer arrived
    create_request_s: float
    #: When each device's success was stored, in seconds after the POST's answer, sorted.
    successes_s: list[float]
    observed_s: float
    complete: bool


async def roll_out(
    client: ControlClient,
    model: str,
    settings: RunSettings,
    report: Reporter,
    check: Callable[[], None],
) -> RolloutOutcome:
    """Create the rollout and follow it until every device succeeded, it ended badly, or
    ``rollout_timeout_s`` passed."""
    sent = time.monotonic()
    created = await client.post(
        "/rollouts", {"model": model, "selector": {"all": True}, "waves": settings.waves}
    )
    answered_wall, answered = time.time(), time.monotonic()
    rollout_id = created["id"]
    report(f"rollout {rollout_id}: waves {[len(w['devices']) for w in created['waves']]}")
    shown = created
    while True:
        counts = shown["counts"]
        if counts.get("succeeded", 0) == settings.devices or shown["state"] in ENDED_BADLY:
            break
        check()
        if time.monotonic() - answered > settings.rollout_timeout_s:
            break
        report(f"  {time.monotonic() - answered:6.1f} s  {shown['state']}  {counts}")
        await asyncio.sleep(POLL_S)
        shown = await client.get(f"/rollouts/{rollout_id}")
    observed = time.monotonic() - answered
    report(f"  {observed:6.1f} s  {shown['state']}  {shown['counts']}")
    return RolloutOutcome(
        rollout=shown,
        created_at=answered_wall,
        create_request_s=answered - sent,
        successes_s=success_times(shown, answered_wall),
        observed_s=observed,
        complete=shown["counts"].get("succeeded", 0) == settings.devices,
    )


async def settle(client: ControlClient, rollout: dict[str, Any]) -> dict[str, Any]:
    """The rollout once its last wave is judged (every device succeeded, so it is about to
    be), for the waves' own times; at most ``SETTLE_S`` later, not counted anywhere."""
    deadline = time.monotonic() + SETTLE_S
    shown = rollout
    while shown["state"] == "running" and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
        shown = await client.get(f"/rollouts/{rollout['id']}")
    return shown


# --------------------------------------------------------------------------- one size


@contextlib.contextmanager
def servers(work: Path, settings: RunSettings) -> Iterator[tuple[Broker, Fleet]]:
    """The broker and the control plane, stopped on the way out whatever happens."""
    with contextlib.ExitStack() as stack:
        broker = Broker(work)
        stack.callback(broker.stop)
        broker.wait_ready()
        fleet = Fleet(work, broker.url, settings.control)
        control = fleet.start_control()
        stack.callback(control.stop)
        yield broker, fleet


def device_entries(work: Path, fleet: Fleet, count: int) -> list[dict[str, str]]:
    ids = [f"sim-{i:04d}" for i in range(count)]
    bundles = fleet.issue(ids, work / "bundles")
    return [
        {"id": i, "bundle": str(b), "state_dir": str(work / "devices" / i)}
        for i, b in zip(ids, bundles, strict=True)
    ]


async def measure_size(settings: RunSettings, progress: harness.Progress) -> SizeRun | Unfinished:
    report = Reporter(progress)
    with (
        harness.temp_dir("edgelm-fleet-", short=True) as work,
        servers(work, settings) as (broker, fleet),
    ):
        started = time.monotonic()
        model = await asyncio.to_thread(fleet.push, "1.0")
        entries = await asyncio.to_thread(device_entries, work, fleet, settings.devices)
        provision_s = time.monotonic() - started
        report(f"fleet ready: {model} pushed, {settings.devices} bundles ({provision_s:.1f} s)")
        async with (
            workers(work, entries, settings) as pool,
            ControlClient(fleet.control_url, fleet.token, timeout_s=120) as client,
        ):
            try:
                run = await _measure_fleet(
                    work, settings, pool, fleet, broker, client, model, report
                )
            except StageUnfinished as exc:
                return Unfinished(settings.devices, len(pool), exc.stage, exc.detail)
    if isinstance(run, Unfinished):
        return run
    return dataclasses.replace(run, provision_s=provision_s)


async def _measure_fleet(
    work: Path,
    settings: RunSettings,
    pool: list[Worker],
    fleet: Fleet,
    broker: Broker,
    client: ControlClient,
    model: str,
    report: Reporter,
) -> SizeRun | Unfinished:
    n = settings.devices
    assert fleet.control is not None
    control = fleet.control
    stall_s = settings.setup_stall_s

    def check() -> None:
        for worker in pool:
            worker.check_alive(work / f"worker-{worker.index}.stderr")
        control.check_alive()
        broker.check_alive()

    def imported() -> bool | int:
        done = sum(w.status.imported for w in pool)
        return done == len(pool) or done

    await wait_for(imported, "setup", "the workers' imports", stall_s, check)
    after_imports = memory(pool, fleet, broker)

    def enrolled() -> bool | int:
        done = totals(pool).enrolled
        report(f"enrolled {done}/{n}")
        return done == n or done

    enroll_s = await wait_for(enrolled, "setup", "enrollment", stall_s, check)

    async def online() -> bool | tuple[int, int, int, int]:
        t = totals(pool)
        listed = await online_devices(client)
        report(f"started {t.started}/{n}, connected {t.connected}, deaf {t.deaf}, known {listed}")
        if listed == n and t.connected == n:
            return True
        return (t.started, t.connected, t.deaf, listed)

    what = "every device online (started, connected, deaf, listed online)"
    connect_s = await wait_for(online, "setup", what, stall_s, check, 1.0)
    report(f"setup: enrolled in {enroll_s:.1f} s, all online {connect_s:.1f} s later")
    mark = CpuMark.now(pids(pool, fleet, broker))
    await asyncio.sleep(settings.idle_window_s)
    cpu_idle = mark.until(CpuMark.now(pids(pool, fleet, broker)))
    idle = memory(pool, fleet, broker)
    mark = CpuMark.now(pids(pool, fleet, broker))
    outcome = await roll_out(client, model, settings, report, check)
    cpu_rollout = mark.until(CpuMark.now(pids(pool, fleet, broker)))
    if not outcome.complete:
        shown = outcome.rollout
        return Unfinished(
            n,
            len(pool),
            "rollout",
            f"{shown['counts'].get('succeeded', 0):,} of {n:,} devices succeeded "
            f"{outcome.observed_s:.0f} s after the create call (rollout {shown['state']}, "
            f"devices {shown['counts']}); stopped there",
        )
    settled = await settle(client, outcome.rollout)
    await asyncio.sleep(3)
    serving = memory(pool, fleet, broker)
    setup = {"provision_s": 0.0, "enroll_s": enroll_s, "connect_s": connect_s}
    return _size_run(
        settings,
        pool,
        outcome,
        settled,
        setup,
        (cpu_idle, cpu_rollout),
        (after_imports, idle, serving),
    )


def _size_run(
    settings: RunSettings,
    pool: Sequence[Worker],
    outcome: RolloutOutcome,
    settled: dict[str, Any],
    setup: dict[str, float],
    cpu: tuple[Cpu, Cpu],
    memories: tuple[Memory, Memory, Memory],
) -> SizeRun:
    shown, times = outcome.rollout, outcome.successes_s
    last_wave = shown["waves"][-1]
    last_ids = set(last_wave["devices"])
    last_started = epoch_s(last_wave["started_at"]) - outcome.created_at
    last_first = min(
        epoch_s(d["updated_at"]) - outcome.created_at
        for d in shown["devices"]
        if d["id"] in last_ids
    )
    return SizeRun(
        devices=settings.devices,
        processes=len(pool),
        devices_per_process=tuple(w.devices for w in pool),
        waves=tuple(len(w["devices"]) for w in shown["waves"]),
        waves_requested=settings.waves,
        provision_s=setup["provision_s"],
        enroll_s=setup["enroll_s"],
        connect_s=setup["connect_s"],
        create_request_s=outcome.create_request_s,
        rollout_s=times[-1],
        rollout_observed_s=outcome.observed_s,
        wave_s=wave_seconds(settled),
        half_s=quantile_time(times, 0.5, settings.devices),
        ninety_s=quantile_time(times, 0.9, settings.devices),
        memory_imported=memories[0],
        memory_idle=memories[1],
        memory_serving=memories[2],
        last_wave_start_s=last_started,
        last_wave_first_s=last_first,
        cpu_idle=cpu[0],
        cpu_rollout=cpu[1],
        final_state=str(settled["state"]),
    )
