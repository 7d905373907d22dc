"""What the benchmark scripts in this folder share: the machine they ran on, the server
subprocesses they start, the doc section each one rewrites, and their command-line plumbing.

Each script runs as ``python bench/NAME.py``, which puts this folder first on ``sys.path``, so it
imports this module as ``harness``. mypy, run from the repository's root, knows this folder as the
package ``bench`` instead (as does ``python -m bench.NAME``), hence the scripts'
``if TYPE_CHECKING or __package__: from bench import harness``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Self

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DOC = REPO / "docs" / "benchmarks.md"
DOC_HEADER = """# Benchmarks

Each section is written by one script in `bench/`; re-run it to update its section.
"""

#: Other processes using more than this many cores on average make the run noisy.
BUSY_MACHINE_CORES = 0.1
STOP_TIMEOUT_S = 15.0

#: Takes one progress message.
Progress = Callable[[str], None]


# --------------------------------------------------------------------------- statistics


def paired_ratio(mine: Sequence[float], base: Sequence[float]) -> float:
    """The median over repetitions of ``mine`` over ``base`` in the same repetition: steadier
    than the ratio of the medians when the machine's load changes during the run."""
    return statistics.median(m / b for m, b in zip(mine, base, strict=True))


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# --------------------------------------------------------------------------- processes, files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One server subprocess with its log file; :meth:`stop` is safe to call at any time."""

    def __init__(
        self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  # closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")} | (env or {})
        # Its own session: a Ctrl-C in the terminal reaches only us, and we stop it in order.
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited after a while."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class AgentProcess(ServerProcess):
    """``edgelm agent run`` with its state directory, Unix socket and log in ``workdir`` and
    HTTP on a free loopback port; ``options`` are more of its command-line options."""

    def __init__(self, name: str, workdir: Path, *options: str) -> None:
        self.state_dir = workdir / "state"
        self.socket = workdir / "agent.sock"
        self.port = free_port()
        args = [
            sys.executable,
            "-m",
            "edgelm_cli",
            "agent",
            "run",
            *options,
            "--state-dir",
            str(self.state_dir),
            "--socket",
            str(self.socket),
            "--http",
            f"127.0.0.1:{self.port}",
            "--log-format",
            "json",
        ]
        # The per-client rate limit and in-flight cap are off: one benchmark client is meant
        # to push the server as hard as it goes.
        limits_off = {
            "EDGELM_HTTP_CLIENT_RATE_PER_S": "0",
            "EDGELM_HTTP_CLIENT_MAX_CONCURRENT": "0",
        }
        super().__init__(name, args, workdir / "agent.log", limits_off)


@contextlib.contextmanager
def temp_dir(prefix: str, *, short: bool = False) -> Iterator[Path]:
    """A temporary directory, removed on the way out.

    ``short`` puts it under /tmp, since a Unix socket's path may not exceed 107 bytes.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if short else None))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into an exception so the ``finally`` blocks stop what the run started."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


# --------------------------------------------------------------------------- the machine


@dataclass(frozen=True)
class CpuSnapshot:
    """Busy CPU time of the whole machine and of this process and its (reaped) children."""

    wall_s: float
    machine_busy_s: float
    own_s: float

    @classmethod
    def now(cls) -> CpuSnapshot:
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system
        return cls(time.monotonic(), machine_busy_s(), own)

    def other_cores_since(self, earlier: CpuSnapshot) -> float:
        """Average cores other processes (and the hypervisor's steal) took in between.

        Correct once every process the benchmark started has been stopped and reaped: only
        then do their CPU times count among this process's children.
        """
        others = (self.machine_busy_s - earlier.machine_busy_s) - (self.own_s - earlier.own_s)
        return max(0.0, others / (self.wall_s - earlier.wall_s))


def machine_busy_s() -> float:
    """Seconds all cores together spent neither idle nor waiting for I/O, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def python_version() -> str:
    return sys.version.split()[0]


@dataclass(frozen=True)
class RunStart:
    """Taken when a run starts: what :meth:`Environment.measured` compares the end with."""

    started: datetime
    load_at_start: tuple[float, float, float]
    cpu_at_start: CpuSnapshot

    @classmethod
    def now(cls) -> RunStart:
        return cls(datetime.now(UTC), load_average(), CpuSnapshot.now())


@dataclass(frozen=True)
class Environment:
    """The machine and its load during a run.

    Each script subclasses it with the versions it reports (as ``str`` fields), which
    :meth:`measured` fills in from its keyword arguments.
    """

    date: str
    cpu: str
    cores: int
    load_average_at_start: tuple[float, float, float]
    load_average_at_end: tuple[float, float, float]
    #: Average cores that processes other than the benchmark's took during the run.
    other_processes_cores: float

    @classmethod
    def measured(cls, start: RunStart, **versions: str) -> Self:
        """The run's environment, from ``start`` to now.

        Call it once every process the run started has been stopped and reaped.
        """
        other_cores = CpuSnapshot.now().other_cores_since(start.cpu_at_start)
        return cls(
            date=start.started.strftime("%Y-%m-%d %H:%M UTC"),
            cpu=cpu_model(),
            cores=os.cpu_count() or 0,
            load_average_at_start=start.load_at_start,
            load_average_at_end=load_average(),
            other_processes_cores=round(other_cores, 3),
            **versions,
        )


def machine_facts(env: Environment) -> list[str]:
    """The date, the CPU and its load, as the first items of a section's Markdown list."""
    load_start = ", ".join(f"{x:g}" for x in env.load_average_at_start)
    load_end = ", ".join(f"{x:g}" for x in env.load_average_at_end)
    return [
        f"- Date: {env.date}",
        f"- CPU: {env.cpu}, {env.cores} cores. Load average at start {load_start}, at end "
        f"{load_end} (the end includes the benchmark itself); other processes took "
        f"{env.other_processes_cores:.2f} cores on average during the run",
    ]


def caution(env: Environment) -> list[str]:
    """A warning paragraph when other processes shared the CPU, else nothing."""
    if env.other_processes_cores <= BUSY_MACHINE_CORES:
        return []
    return [
        f"**Caution**: other processes took {env.other_processes_cores:.2f} cores on average "
        "while this ran, so these numbers are disturbed; re-run on a quiet machine.",
        "",
    ]


def print_caution(console: Console, env: Environment) -> None:
    for line in caution(env):
        console.print(f"[yellow]{line.replace('**', '')}[/yellow]")


# --------------------------------------------------------------------------- docs/benchmarks.md


def markdown_table(headings: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A Markdown table whose first ``left`` columns are left-aligned, the others right."""
    lines = [
        "| " + " | ".join(headings) + " |",
        "|" + "|".join(["---"] * left + ["---:"] * (len(headings) - left)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def rich_table(
    title: str, headings: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1
) -> Table:
    """:func:`markdown_table` for the terminal; the first column does not wrap if it is a left
    one (the contenders' names)."""
    table = Table(title=title)
    for i, heading in enumerate(headings):
        table.add_column(
            heading, justify="left" if i < left else "right", no_wrap=i == 0 and left > 0
        )
    for cells in rows:
        table.add_row(*cells)
    return table


def markers(name: str) -> tuple[str, str]:
    """The comments that begin and end section ``name`` in the doc."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(doc: Path, name: str, section: str, *, after: str | None = None) -> None:
    """Replace section ``name`` in ``doc``, or add it after section ``after`` (or at the end);
    every other section is left as it is.

    The file is read right before it is written, since other scripts own other sections, and
    replaced in one step.
    """
    begin_marker, end_marker = markers(name)
    text = doc.read_text() if doc.exists() else DOC_HEADER
    begin, end = text.find(begin_marker), text.find(end_marker)
    preceding_end = markers(after)[1] if after is not None else None
    if begin != -1 and end > begin:
        tail = text[end + len(end_marker) :].lstrip("\n")
        text = text[:begin] + section + ("\n" + tail if tail else "")
    elif preceding_end is not None and (found := text.find(preceding_end)) != -1:
        cut = found + len(preceding_end)
        tail = text[cut:].lstrip("\n")
        text = text[:cut] + "\n\n" + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(f"{doc.name}.{name}-tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)


# --------------------------------------------------------------------------- command line


def argument_parser(description: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows every option's default."""
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


def add_output_options(parser: argparse.ArgumentParser, *, json_help: str) -> None:
    """``--doc``, ``--no-write`` and ``--json``, which :func:`publish` acts on."""
    parser.add_argument(
        "--doc", type=Path, default=DEFAULT_DOC, help="Markdown file whose section to update"
    )
    parser.add_argument("--no-write", action="store_true", help="only print, write no doc")
    parser.add_argument("--json", action="store_true", help=json_help)


def json_fields(data: Any) -> dict[str, Any]:
    """A dataclass's fields as ``dataclasses.asdict`` gives them, with paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(data).items()}


def publish(
    args: argparse.Namespace,
    console: Console,
    name: str,
    as_json: Callable[[], dict[str, Any]],
    markdown: Callable[[], str],
    *,
    after: str | None = None,
) -> None:
    """Print the JSON on stdout with ``--json``; write the doc's section unless ``--no-write``."""
    if args.json:
        print(json.dumps(as_json(), indent=2))
    if not args.no_write:
        write_section(args.doc, name, markdown(), after=after)
        console.print(f"updated {args.doc}")


def start_run(args: argparse.Namespace, *, width: int) -> tuple[Console, Console]:
    """Turn SIGTERM into KeyboardInterrupt; return the console for the results and the one for
    progress (both on stderr with ``--json``, so that stdout carries only the JSON)."""
    raise_on_sigterm()
    return make_console(stderr=args.json, width=width), make_console(stderr=True, width=width)


def make_console(*, stderr: bool, width: int) -> Console:
    """``width`` wide when the output is a file or a pipe, so that the tables fit."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else width)


def this_command() -> str:
    """This run's command line, relative to the repository where possible."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    return shlex.join(["python", str(script), *sys.argv[1:]])
