"""What ``bench/fleet.py`` found, and how it is shown: the terminal's tables, the JSON, and its
section of ``docs/benchmarks.md``."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING or __package__:
    from bench import harness
    from bench.fleet_run import Cpu, Memory, RunSettings, SizeRun, Unfinished
    from bench.fleet_setup import BROKER_SETTINGS, ControlSettings
else:
    import harness
    from fleet_run import Cpu, Memory, RunSettings, SizeRun, Unfinished
    from fleet_setup import BROKER_SETTINGS, ControlSettings

SECTION = "fleet"
SECTION_BEGIN, SECTION_END = harness.markers(SECTION)
REPRODUCE = "`make bench-fleet`, which runs `python bench/fleet.py`"

#: The budget ``tests/integration/control/telemetry_rate.py`` states: telemetry messages
#: stored per second on SQLite, at least.
TELEMETRY_TARGET_PER_S = 5000.0
MB = 1000.0  # kB per MB: MB = 10^6 bytes, as in the other sections
DASH = "—"


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    processes: int
    repeats: int
    waves: str
    telemetry_interval_s: float
    executor_threads: int
    control_log_level: str
    rollout_timeout_s: float
    setup_stall_s: float
    idle_window_s: float
    telemetry_runs: int
    telemetry_messages: int

    def run_settings(self, devices: int) -> RunSettings:
        return RunSettings(
            devices=devices,
            processes=min(self.processes, devices),
            waves=self.waves,
            telemetry_interval_s=self.telemetry_interval_s,
            executor_threads=self.executor_threads,
            setup_stall_s=self.setup_stall_s,
            rollout_timeout_s=self.rollout_timeout_s,
            idle_window_s=self.idle_window_s,
            control=ControlSettings(log_level=self.control_log_level),
        )


@dataclass(frozen=True)
class TelemetryResult:
    database: str
    rates: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


@dataclass(frozen=True)
class Environment(harness.Environment):
    python: str
    mosquitto: str
    sqlite: str
    llama_cpp_python: str
    paho_mqtt: str


@dataclass(frozen=True)
class Report:
    settings: Settings
    environment: Environment
    #: Per size, its finished runs (every device succeeded) …
    runs: dict[int, list[SizeRun]]
    #: … and the runs that did not get there, with why.
    unfinished: list[Unfinished]
    telemetry: list[TelemetryResult]
    command: str

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": dataclasses.asdict(self.settings),
            "environment": dataclasses.asdict(self.environment),
            "runs": {str(n): [dataclasses.asdict(r) for r in rs] for n, rs in self.runs.items()},
            "unfinished": [dataclasses.asdict(u) for u in self.unfinished],
            "telemetry": [dataclasses.asdict(t) for t in self.telemetry],
            "command": self.command,
        }

    @property
    def sizes(self) -> list[int]:
        """Every size that was attempted, in order."""
        return sorted({*self.runs, *(u.devices for u in self.unfinished)})

    def finished_sizes(self) -> list[int]:
        return [n for n in self.sizes if self.runs.get(n)]

    def median_run(self, devices: int) -> SizeRun:
        """The run with the median rollout time (the lower middle one of an even count)."""
        ordered = sorted(self.runs[devices], key=lambda r: r.rollout_s)
        return ordered[(len(ordered) - 1) // 2]

    def unfinished_of(self, devices: int) -> list[Unfinished]:
        return [u for u in self.unfinished if u.devices == devices]


# --------------------------------------------------------------------------- cells


def seconds(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def spread(runs: Sequence[SizeRun], pick: Callable[[SizeRun], float]) -> str:
    """The median, with the range in parentheses when there are several runs."""
    values = [pick(r) for r in runs]
    median = seconds(statistics.median(values))
    if len(values) < 2:
        return median
    return f"{median} ({seconds(min(values))}..{seconds(max(values))})"


def layout_cell(processes: int, shares: Sequence[int]) -> str:
    return f"{processes} x {'/'.join(str(n) for n in sorted(set(shares), reverse=True))}"


ROLLOUT_HEADINGS = (
    "devices",
    "workers x devices",
    "waves",
    "enroll s",
    "then all online s",
    "create call ms",
    "50% succeeded s",
    "90% succeeded s",
    "all succeeded s",
    "last wave started s",
    "its first success s",
    "waves' own s",
)


def rollout_rows(report: Report) -> list[list[str]]:
    rows = []
    for devices in report.sizes:
        runs = report.runs.get(devices, [])
        if runs:
            run = report.median_run(devices)
            rows.append(
                [
                    f"{devices:,}",
                    layout_cell(run.processes, run.devices_per_process),
                    " + ".join(f"{n:,}" for n in run.waves),
                    spread(runs, lambda r: r.enroll_s),
                    spread(runs, lambda r: r.connect_s),
                    f"{statistics.median(r.create_request_s for r in runs) * 1000:.0f}",
                    spread(runs, lambda r: r.half_s),
                    spread(runs, lambda r: r.ninety_s),
                    spread(runs, lambda r: r.rollout_s),
                    spread(runs, lambda r: r.last_wave_start_s),
                    spread(runs, lambda r: r.last_wave_first_s),
                    " + ".join(seconds(s) for s in run.wave_s) or DASH,
                ]
            )
        for failed in report.unfinished_of(devices):
            cells = [f"{devices:,}", layout_cell(failed.processes, [])]
            cells += [DASH] * (len(ROLLOUT_HEADINGS) - 2)
            cells[ROLLOUT_HEADINGS.index("all succeeded s")] = f"**not finished** ({failed.stage})"
            rows.append(cells)
    return rows


def unfinished_lines(report: Report) -> list[str]:
    return [f"{u.devices:,} devices, {u.stage}: {u.detail}." for u in report.unfinished]


MEMORY_HEADINGS = (
    "devices",
    "workers after imports MB",
    "workers, fleet idle MB",
    "workers, all serving MB",
    "per device idle MB",
    "per device serving MB",
    "per device serving, with imports MB",
    "control plane MB",
    "broker MB",
)


def per_device(memory: Memory, devices: int, less: Memory | None = None) -> float:
    """Workers' VmRSS per device in MB, less what they held after ``less``."""
    total = memory.workers_total_kb - (less.workers_total_kb if less else 0)
    return total / devices / MB


def memory_cells(report: Report, devices: int) -> list[str]:
    run = report.median_run(devices)
    base = run.memory_imported
    return [
        f"{devices:,}",
        f"{base.workers_total_kb / MB:.0f}",
        f"{run.memory_idle.workers_total_kb / MB:.0f}",
        f"{run.memory_serving.workers_total_kb / MB:.0f}",
        f"{per_device(run.memory_idle, devices, base):.2f}",
        f"{per_device(run.memory_serving, devices, base):.2f}",
        f"{per_device(run.memory_serving, devices):.2f}",
        f"{run.memory_serving.control_kb / MB:.0f}",
        f"{run.memory_serving.broker_kb / MB:.0f}",
    ]


CPU_HEADINGS = (
    "devices",
    "window",
    "wall s",
    "devices' workers, cores",
    "control plane, cores",
    "broker, cores",
    "all three, cores",
    "per device, ms CPU/s",
)


def cores(cpu_s: float, cpu: Cpu) -> str:
    return f"{cpu_s / cpu.wall_s:.2f}"


def cpu_cells(devices: int, window: str, cpu: Cpu) -> list[str]:
    total = cpu.workers_s + cpu.control_s + cpu.broker_s
    return [
        f"{devices:,}",
        window,
        f"{cpu.wall_s:.1f}",
        cores(cpu.workers_s, cpu),
        cores(cpu.control_s, cpu),
        cores(cpu.broker_s, cpu),
        cores(total, cpu),
        f"{cpu.workers_s / cpu.wall_s / devices * 1000:.2f}",
    ]


def cpu_rows(report: Report) -> list[list[str]]:
    rows = []
    for devices in report.finished_sizes():
        run = report.median_run(devices)
        rows.append(cpu_cells(devices, "idle, connected", run.cpu_idle))
        rows.append(cpu_cells(devices, "rollout", run.cpu_rollout))
    return rows


TELEMETRY_HEADINGS = ("database", "median messages/s", "runs", "target")


def telemetry_cells(result: TelemetryResult) -> list[str]:
    verdict = "met" if result.median >= TELEMETRY_TARGET_PER_S else "**missed**"
    return [
        result.database,
        f"{result.median:,.0f}",
        ", ".join(f"{r:,.0f}" for r in result.rates),
        f">= {TELEMETRY_TARGET_PER_S:,.0f}: {verdict}",
    ]


# --------------------------------------------------------------------------- summary lines


def rollout_lines(report: Report) -> list[str]:
    lines = []
    for devices in report.finished_sizes():
        run = report.median_run(devices)
        lines.append(
            f"{devices:,} devices: every device succeeded {run.rollout_s:.1f} s after the "
            f"create call returned; during the rollout the devices' workers took "
            f"{run.cpu_rollout.workers_s / run.cpu_rollout.wall_s:.2f} cores, the control "
            f"plane {run.cpu_rollout.control_s / run.cpu_rollout.wall_s:.2f}, the broker "
            f"{run.cpu_rollout.broker_s / run.cpu_rollout.wall_s:.2f}."
        )
    return lines + unfinished_lines(report)


def telemetry_lines(report: Report) -> list[str]:
    lines = []
    for result in report.telemetry:
        head = f"Telemetry stored ({result.database}, target >= {TELEMETRY_TARGET_PER_S:,.0f}/s)"
        ratio = result.median / TELEMETRY_TARGET_PER_S
        verdict = "**met**" if result.median >= TELEMETRY_TARGET_PER_S else "**missed**"
        lines.append(
            f"{head}: {verdict}, {result.median:,.0f} messages/s "
            f"(median of {len(result.rates)}), {ratio:.2f}x the target."
        )
    return lines


def memory_line(report: Report) -> str | None:
    parts = []
    for devices in report.finished_sizes():
        run = report.median_run(devices)
        parts.append(
            f"{devices:,} devices: "
            f"{per_device(run.memory_serving, devices, run.memory_imported):.2f} MB per device "
            f"serving the model ({per_device(run.memory_idle, devices, run.memory_imported):.2f}"
            " MB connected and idle, before it)"
        )
    if not parts:
        return None
    return "Memory per simulated device, beyond the workers' imports: " + "; ".join(parts) + "."


def summary(report: Report) -> list[str]:
    memory = memory_line(report)
    return [*rollout_lines(report), *telemetry_lines(report), *([memory] if memory else [])]


# --------------------------------------------------------------------------- output


def rich_tables(report: Report) -> list[Table]:
    tables = [harness.rich_table("rollout", ROLLOUT_HEADINGS, rollout_rows(report), left=3)]
    if report.finished_sizes():
        tables += [
            harness.rich_table(
                "memory (VmRSS)",
                MEMORY_HEADINGS,
                [memory_cells(report, n) for n in report.finished_sizes()],
            ),
            harness.rich_table("CPU", CPU_HEADINGS, cpu_rows(report), left=2),
        ]
    if report.telemetry:
        tables.append(
            harness.rich_table(
                "telemetry stored",
                TELEMETRY_HEADINGS,
                [telemetry_cells(t) for t in report.telemetry],
            )
        )
    return tables


def run_facts(report: Report) -> list[str]:
    s, env = report.settings, report.environment
    broker = ", ".join(f"`{line}`" for line in BROKER_SETTINGS if not line.startswith("log"))
    sync = "the agent's own `SyncService`"
    return [
        *harness.machine_facts(env),
        f"- Fleets: {', '.join(f'{n:,}' for n in s.sizes)} simulated devices, a fresh fleet "
        f"for each ({s.repeats} per size), hosted by {s.processes} worker processes; each "
        f"device is {sync}, `ModelManager` with llama.cpp on 1 thread, and the agent's "
        f"defaults otherwise (telemetry every {s.telemetry_interval_s:g} s); each worker's "
        f"asyncio thread pool has {s.executor_threads} threads",
        f"- Rollout: `--all --waves {s.waves}` (no pause between waves, the server's default "
        "thresholds) of the test suite's `tiny-llama.gguf` (758,624 bytes), pushed with "
        f"`edgelm fleet models push`; a size not finished {s.rollout_timeout_s:.0f} s after "
        f"the create call, or whose setup made no progress for {s.setup_stall_s:.0f} s, is "
        "reported as not finished",
        f"- Broker: Mosquitto {env.mosquitto} of its own on a free loopback port: {broker}",
        "- Control plane: `edgelm control run` with the control.toml `fleet-init` writes "
        f"(SQLite), JSON logs at level {s.control_log_level}",
        f"- Python {env.python}, SQLite {env.sqlite}, llama-cpp-python {env.llama_cpp_python}, "
        f"paho-mqtt {env.paho_mqtt}",
        f"- This run: `{report.command}`",
        f"- Reproduce: {REPRODUCE}",
    ]


def idle_note(report: Report) -> list[str]:
    """How much of the machine the idle fleet took: what the rollout competes with."""
    largest = report.finished_sizes()[-1]
    cpu = report.median_run(largest).cpu_idle
    return [
        f"Connected and idle, the {largest:,} simulated devices took "
        f"{cpu.workers_s / cpu.wall_s:.2f} of the 2 cores "
        f"({cpu.workers_s / cpu.wall_s / largest * 1000:.2f} ms of CPU per device per "
        "second: the agent's sync loops wake every second or two, each device on its own), "
        "and during the rollout the control plane ran on what they left.",
        "",
    ]


def markdown_section(report: Report) -> str:
    s = report.settings
    parts = [
        SECTION_BEGIN,
        "## Fleet: rollouts, telemetry stored, memory per device (`bench/fleet.py`)",
        "",
        "A rollout of the tiny model to simulated fleets through one Mosquitto and one "
        "control plane, timed from the moment `POST /api/v1/rollouts` (what `edgelm fleet "
        "rollouts create` sends) returned until the control plane had stored every device's "
        "success (the latest `updated_at` of the rollout's rows, all `succeeded`). Each "
        "simulated device is the agent's own sync stack (`SyncService` over its own MQTT "
        "session, `Registry` with its TUF download and verification, `ModelManager` "
        "activating the model with its health check on llama.cpp), in its own state "
        "directory, enrolled from its own bundle; several hundred share a worker process and "
        "its event loop. The script's docstring explains the method.",
        "",
        "**This machine**: 2 cores shared by everything: the broker, the control plane, every "
        "simulated device, and whatever else runs on the machine at the time. Real devices "
        "each bring their own CPU, so here the devices' own work competes with the control "
        "plane's (see the CPU table); read the times as what this one small box manages, not "
        "as the control plane's limit.",
        "",
        *run_facts(report),
        "",
        *harness.caution(report.environment),
        "### Rollout",
        "",
        "Setup is not part of the rollout's time: *enroll* runs from the workers' start until "
        "every device had installed its bundle, *then all online* until the control plane "
        "listed every device online with its reported state. Everything else counts from the "
        "create call's answer, by the control plane's timestamps; *last wave started* is when "
        "it began signing and publishing that wave's desired states, *its first success* when "
        "the first of its devices succeeded. *Waves' own s* is each wave's start to its "
        "verdict.",
        "",
        harness.markdown_table(ROLLOUT_HEADINGS, rollout_rows(report), 3),
        "",
    ]
    if report.unfinished:
        parts += ["Not finished:", "", *(f"- {line}" for line in unfinished_lines(report)), ""]
    if report.finished_sizes():
        parts += [
            "### Memory",
            "",
            "VmRSS of the worker processes, summed: after their imports (before any device), "
            "with the fleet connected and idle (no model yet), and with every device serving "
            "the model (its llama.cpp context included). *Per device* subtracts what the "
            "workers held after their imports and divides by the devices; *with imports* "
            "does not subtract. MB = 10^6 bytes.",
            "",
            harness.markdown_table(
                MEMORY_HEADINGS, [memory_cells(report, n) for n in report.finished_sizes()]
            ),
            "",
            "### CPU",
            "",
            f"CPU time from /proc over the idle window ({s.idle_window_s:g} s, every device "
            "connected, before the rollout) and over the rollout, as average cores; the "
            "machine has 2.",
            "",
            harness.markdown_table(CPU_HEADINGS, cpu_rows(report), 2),
            "",
            *idle_note(report),
        ]
    if report.telemetry:
        parts += [
            "### Telemetry stored per second",
            "",
            "`tests/integration/control/telemetry_rate.py`'s end-to-end measurement, run "
            f"{s.telemetry_runs} times: the control plane (SQLite) drains a backlog of "
            f"{s.telemetry_messages:,} telemetry messages from 100 devices through a Mosquitto "
            "of its own (QoS 1, each acknowledged once stored); rows stored over the time from "
            "the first to the last. The target is the one that script states.",
            "",
            harness.markdown_table(
                TELEMETRY_HEADINGS, [telemetry_cells(t) for t in report.telemetry]
            ),
            "",
        ]
    parts.append(SECTION_END)
    return "\n".join(parts) + "\n"
