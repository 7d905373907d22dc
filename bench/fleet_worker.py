"""A worker process of ``bench/fleet.py``: it hosts a share of the simulated fleet.

``python bench/fleet_worker.py SPEC.json`` enrolls each device the spec lists (in its own state
directory, from its own bundle), starts them all on one event loop (see
:mod:`fleet_device`), and then reports, one JSON object per line on stdout, how many are
connected to the broker and how many serve a model, once a second, until SIGTERM or SIGINT
stops every device and the process exits. The parent reads those lines for its progress;
everything it measures it reads from the control plane and from /proc.

The spec::

    {"devices": [{"id": "sim-0001", "bundle": "...json", "state_dir": "..."}, ...],
     "threads": 1, "telemetry_interval_s": 60, "executor_threads": 32,
     "log": "worker-0.log"}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from edgelm_agent.logs import configure_logging

if TYPE_CHECKING or __package__:  # mypy, or `python -m bench.fleet_worker`
    from bench.fleet_device import DeviceSettings, SimDevice, enroll
else:  # `python bench/fleet_worker.py` puts this folder on sys.path
    from fleet_device import DeviceSettings, SimDevice, enroll

T = TypeVar("T")

STATUS_EVERY_S = 1.0
#: Devices started at once: their first connections and database migrations come in bursts
#: this big rather than all at once.
START_BATCH = 25
#: Enrollments in flight at once: each one waits on the control plane's repository.
ENROLL_THREADS = 4


def emit(**fields: Any) -> None:
    """One progress line for the parent."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def raise_open_file_limit() -> int:
    """Each device holds a few descriptors (its database, WAL, MQTT socket, registry lock,
    model file): hundreds of devices need more than the usual soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


async def enroll_all(entries: Sequence[dict[str, str]]) -> None:
    """Enroll every device, a few at a time, reporting progress."""
    done = 0
    gate = asyncio.Semaphore(ENROLL_THREADS)

    async def one(entry: dict[str, str]) -> None:
        nonlocal done
        async with gate:
            await asyncio.to_thread(enroll, Path(entry["state_dir"]), Path(entry["bundle"]))
        done += 1
        if done % 25 == 0 or done == len(entries):
            emit(event="enrolled", count=done)

    await asyncio.gather(*(one(entry) for entry in entries))


async def start_all(
    entries: Sequence[dict[str, str]], settings: DeviceSettings, devices: list[SimDevice]
) -> None:
    """Start every device, a batch at a time; each joins ``devices`` before it starts, so
    that a stop in the middle stops it too."""
    for first in range(0, len(entries), START_BATCH):
        batch = [
            SimDevice(Path(entry["state_dir"]), settings)
            for entry in entries[first : first + START_BATCH]
        ]
        devices += batch
        await asyncio.gather(*(device.start() for device in batch))
        emit(event="started", count=len(devices))


async def report_status(devices: Sequence[SimDevice], stop: asyncio.Event) -> None:
    while not stop.is_set():
        emit(
            event="status",
            connected=sum(d.connected for d in devices),
            deaf=sum(d.deaf for d in devices),
            serving=sum(d.active_model is not None for d in devices),
            total=len(devices),
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATUS_EVERY_S)


async def stop_all(devices: Sequence[SimDevice]) -> None:
    started = time.monotonic()
    await asyncio.gather(*(device.stop() for device in devices), return_exceptions=True)
    emit(event="stopped", count=len(devices), seconds=round(time.monotonic() - started, 1))


async def run(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    # Each real device has asyncio's default executor to itself (downloads, model loads and
    # registry reads run there); these devices share one, so it gets more threads.
    loop.set_default_executor(ThreadPoolExecutor(int(spec["executor_threads"]), "bench-exec"))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    entries: list[dict[str, str]] = spec["devices"]
    settings = DeviceSettings(
        threads=int(spec["threads"]),
        telemetry_interval_s=float(spec["telemetry_interval_s"]),
    )
    devices: list[SimDevice] = []
    try:
        await _unless_stopped(enroll_all(entries), stop)
        await _unless_stopped(start_all(entries, settings, devices), stop)
        await report_status(devices, stop)
    finally:
        await stop_all(devices)


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or ``None`` once ``stop`` is set first (the work is cancelled)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    return None


def open_log(path: str) -> TextIO:
    return open(path, "a", buffering=1)  # the process's log, open until exit


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(Path(args[0]).read_text())
    raise_open_file_limit()
    configure_logging("json", spec.get("log_level", "warning"), stream=open_log(spec["log"]))
    emit(event="imported")
    asyncio.run(run(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
