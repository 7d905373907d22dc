"""How long does a staged rollout of the tiny model to 100, 500 and 1,000 simulated devices
take, how many telemetry messages does the control plane store per second, and how much memory
does each simulated device take?

**The rollout** (:mod:`fleet_run` has the steps). Each size gets a fresh fleet: its own
Mosquitto on a free loopback port with a temporary configuration, ``fleet-init``, ``edgelm
control run`` as a subprocess (SQLite, fleet-init's settings), the tiny GGUF
(``tests/fixtures/tiny-llama.gguf``) pushed with ``edgelm fleet models push``, and one
enrollment bundle per device. Each simulated device is the agent's own sync stack
(:mod:`fleet_device`): ``SyncService`` and its ``SyncSession`` over the device's own MQTT
session, its ``Registry`` (TUF download and verification) and ``ModelManager`` (activation with
the health check, llama.cpp on one thread), each in its own state directory, enrolled from its
bundle. ``--processes`` worker processes (:mod:`fleet_worker`) host the devices, an equal share
each, all of a process's devices on one event loop. Once the control plane lists every device
online, the rollout is created with ``--all`` and ``--waves`` (default ``1%,rest``: a canary of
1% of the fleet, then the rest, each wave starting when the one before it passed) and timed
from the moment the create call's answer arrived until the control plane had stored every
device's success. A size whose rollout has not finished after ``--rollout-timeout-s``, or whose
setup makes no progress for ``--setup-stall-s``, is reported as not finished, with how far it
got, and the larger sizes are then skipped: no time is ever made up.

**Telemetry**: ``tests/integration/control/telemetry_rate.py``'s end-to-end measurement, run
``--telemetry-runs`` times: ``edgelm control run`` drains, through a Mosquitto of its own, a
backlog of ``--telemetry-messages`` telemetry messages from 100 devices (QoS 1, acknowledged
once stored) into SQLite, and the rate is the rows stored over the time from the first row
stored to the last. Only SQLite: the shared PostgreSQL is left alone.

**Memory**: VmRSS of each worker process after its imports (no device yet), with the fleet
connected and idle, and with every device serving the model; per device is the sum over the
workers, less what they held after their imports, divided by the devices.

What this fleet is not: real devices each have their own CPU, disk and network, while here every
device, the broker and the control plane share two cores and one disk, and the devices of a
worker share one event loop and one thread pool. So the times say what this machine manages,
not what the control plane would with devices of their own.

The result is printed as tables and written to ``docs/benchmarks.md`` between
``<!-- fleet:begin -->`` and ``<!-- fleet:end -->`` (``--no-write`` only prints; ``--json``
prints the raw results as JSON on stdout). Every process it starts (the brokers, the control
planes, the workers) and every temporary directory are removed on the way out, also on Ctrl-C,
SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from edgelm_agent.logs import configure_logging

if TYPE_CHECKING or __package__:  # mypy, or `python -m bench.fleet`, from the repository's root
    from bench import fleet_report, harness
    from bench.fleet_report import Environment, Report, Settings, TelemetryResult
    from bench.fleet_run import SizeRun, Unfinished, measure_size
    from bench.fleet_setup import MOSQUITTO, raise_open_file_limit
else:  # `python bench/fleet.py` puts this folder on sys.path
    import fleet_report
    import harness
    from fleet_report import Environment, Report, Settings, TelemetryResult
    from fleet_run import SizeRun, Unfinished, measure_size
    from fleet_setup import MOSQUITTO, raise_open_file_limit

T = TypeVar("T")

SECTION = "fleet"
DEFAULT_SIZES = "100,500,1000"


# --------------------------------------------------------------------------- telemetry


async def telemetry_rates(runs: int, messages: int, progress: harness.Progress) -> TelemetryResult:
    """The control plane's end-to-end telemetry ingest rate on SQLite, measured ``runs`` times
    by the test suite's own script (``tests/integration/control/telemetry_rate.py``)."""
    if str(harness.REPO) not in sys.path:
        sys.path.insert(0, str(harness.REPO))  # `tests` is the repository's, not installed
    from tests.integration.control.telemetry_rate import end_to_end

    rates = []
    for run in range(runs):
        with tempfile.TemporaryDirectory(prefix="edgelm-fleet-rate-") as tmp:
            rate = await end_to_end(f"sqlite:///{tmp}/control.db", messages)
        progress(f"telemetry on SQLite, run {run + 1}/{runs}: {rate:,.0f} messages/s")
        rates.append(rate)
    return TelemetryResult("sqlite", tuple(rates))


# --------------------------------------------------------------------------- orchestration


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def mosquitto_version() -> str:
    done = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].removeprefix("mosquitto version ").strip() if first else "unknown"


async def measure(settings: Settings, command: str, progress: harness.Progress) -> Report:
    start = harness.RunStart.now()
    runs: dict[int, list[SizeRun]] = {}
    unfinished: list[Unfinished] = []
    for devices in settings.sizes:
        if unfinished:  # a smaller fleet did not finish: a larger one will not either
            reason = f"not run: the {unfinished[0].devices:,}-device fleet did not finish"
            unfinished.append(Unfinished(devices, 0, "skipped", reason))
            progress(f"== {devices} devices: {reason}")
            continue
        for repeat in range(settings.repeats):
            progress(f"== {devices} devices, run {repeat + 1}/{settings.repeats}")
            run = await measure_size(settings.run_settings(devices), progress)
            if isinstance(run, Unfinished):
                progress(f"== {devices} devices: not finished, {run.stage}: {run.detail}")
                unfinished.append(run)
                break
            progress(f"== {devices} devices: every device succeeded {run.rollout_s:.1f} s after")
            runs.setdefault(devices, []).append(run)
    telemetry = []
    if settings.telemetry_runs > 0:
        telemetry.append(
            await telemetry_rates(settings.telemetry_runs, settings.telemetry_messages, progress)
        )
    environment = Environment.measured(
        start,
        python=harness.python_version(),
        mosquitto=mosquitto_version(),
        sqlite=sqlite3.sqlite_version,
        llama_cpp_python=package_version("llama-cpp-python"),
        paho_mqtt=package_version("paho-mqtt"),
    )
    return Report(settings, environment, runs, unfinished, telemetry, command)


async def cancelled_by_sigterm(work: Awaitable[T]) -> T:
    """Run ``work``; SIGTERM cancels it like Ctrl-C does, so every ``finally`` stops what the
    run started (asyncio.run already turns SIGINT into a cancellation)."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


# --------------------------------------------------------------------------- command line


def sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sizes like 100,500,1000, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be at least 1, got {text!r}")
    return tuple(sorted(set(values)))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser(
        "Time a staged rollout of the tiny model to simulated fleets (the agent's real sync "
        "stack, several devices per process) through one Mosquitto, the control plane's "
        "telemetry ingest rate, and the memory each simulated device takes."
    )
    add = parser.add_argument
    add("--sizes", type=sizes, default=DEFAULT_SIZES, help="fleet sizes, comma-separated")
    add("--processes", type=int, default=4, help="worker processes hosting the devices")
    add("--repeats", type=int, default=1, help="fresh fleets per size")
    add("--waves", default="1%,rest", help="the rollout's --waves")
    add(
        "--rollout-timeout-s",
        type=float,
        default=600.0,
        help="a rollout not finished by then is reported as such",
    )
    add(
        "--setup-stall-s",
        type=float,
        default=60.0,
        help="setup without progress this long is reported as not finished",
    )
    add("--idle-window-s", type=float, default=10.0, help="idle fleet's CPU measured this long")
    add("--telemetry-interval-s", type=float, default=60.0, help="the devices' telemetry")
    add("--executor-threads", type=int, default=32, help="thread pool of each worker's loop")
    add("--control-log-level", default="warning", help="the control plane's log level")
    add("--telemetry-runs", type=int, default=3, help="telemetry measurements (0: none)")
    add("--telemetry-messages", type=int, default=30_000, help="messages per measurement")
    harness.add_output_options(parser, json_help="print the raw results as JSON on stdout")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.repeats < 1 or args.telemetry_runs < 0:
        parser.error("need --processes >= 1, --repeats >= 1 and --telemetry-runs >= 0")
    if args.telemetry_runs > 0 and args.telemetry_messages < 2:
        parser.error("need --telemetry-messages >= 2")
    return args


def settings_of(args: argparse.Namespace) -> Settings:
    return Settings(
        sizes=args.sizes,
        processes=args.processes,
        repeats=args.repeats,
        waves=args.waves,
        telemetry_interval_s=args.telemetry_interval_s,
        executor_threads=args.executor_threads,
        control_log_level=args.control_log_level,
        rollout_timeout_s=args.rollout_timeout_s,
        setup_stall_s=args.setup_stall_s,
        idle_window_s=args.idle_window_s,
        telemetry_runs=args.telemetry_runs,
        telemetry_messages=args.telemetry_messages,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(MOSQUITTO).exists():
        print(f"bench/fleet.py needs Mosquitto at {MOSQUITTO}", file=sys.stderr)
        return 2
    console, log = harness.start_run(args, width=160)
    # What the libraries this process runs log (the telemetry measurement opens the control
    # plane's store here) goes to stderr, warnings and worse only: stdout carries --json.
    configure_logging("console", "warning", stream=sys.stderr)
    raise_open_file_limit()
    say: Callable[[str], None] = lambda message: log.log(message)  # noqa: E731
    try:
        report = asyncio.run(
            cancelled_by_sigterm(measure(settings_of(args), harness.this_command(), say))
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        log.print("interrupted; every process stopped, temporary files removed")
        return 130
    for table in fleet_report.rich_tables(report):
        console.print(table)
    for line in fleet_report.summary(report):
        console.print(line.replace("**", ""))
    harness.print_caution(console, report.environment)
    with contextlib.suppress(BrokenPipeError):
        harness.publish(
            args, console, SECTION, report.as_json, lambda: fleet_report.markdown_section(report)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
