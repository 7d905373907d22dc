"""How much memory does an idle agent hold, with no model and with one loaded?

The project budgets it: "An idle agent without a model stays under 80 MB of RSS." This script
starts a real ``edgelm agent run`` subprocess (fresh state directory, its Unix socket and a
loopback HTTP port, the agent's defaults otherwise) and reads its memory from /proc once it is
idle. Three configurations:

* **no model**: the budget's case, an agent started again on its state directory, as a device's
  agent is on every boot but the first. It is ready (``/healthz`` answers and it has logged
  ``agent_ready``), then left alone for ``--settle-s`` seconds before the reading.
* **no model, first start**: the same on a fresh state directory, where the agent also creates
  its job database: the migrations import sqlite_utils (which the agent keeps from importing
  numpy).
* **tiny-llama.gguf** (the test suite's 0.8 MB random-weight model) and the default model
  (``--model``; skipped, with a note, if the file is missing), for context: read once idle after
  the model loaded (activation already runs the agent's health check, a short generation), and
  again idle ``--settle-s`` after one short completion through ``/v1/completions``, which shows
  whether serving a request leaves more memory behind.

Figures, all from the agent's own process (it starts no children), in MB = 10^6 bytes:

* VmRSS (/proc/PID/status): resident pages, the figure the budget names. It counts every
  resident page the process maps, also pages other processes share (the interpreter's and the
  libraries' code, a memory-mapped model), so it overstates what one more agent costs;
* VmHWM: the peak of VmRSS since the process started, which shows what start-up and loading
  needed on the way;
* PSS (/proc/PID/smaps_rollup, where the kernel has it): resident pages, each shared page
  divided among the processes sharing it; the honest figure of what this process costs;
* anonymous RSS (RssAnon): the heap and other private memory, as opposed to mapped files.

Which large libraries the process has mapped is read from /proc/PID/maps: numpy, for instance,
which sqlite_utils would import whenever it is installed, were the agent not keeping it out. For
scale, the script also reads the VmRSS of a bare Python interpreter and of one that imported
numpy, each the median of ``--repeats`` fresh processes.

Method, and why. Memory does not vary with the machine's load the way timings do, but it does
vary between starts (allocator state, lazily imported modules, the order threads run in), so
every configuration starts afresh ``--repeats`` times, in rotating order, and the table gives
medians and p25..p75. The budget is judged on the largest VmRSS over all starts without a
model: "stays under" holds for every start or it does not.

The result is printed as a table and written to ``docs/benchmarks.md`` between
``<!-- footprint:begin -->`` and ``<!-- footprint:end -->`` (``--no-write`` only prints;
``--json`` prints the raw readings as JSON on stdout). Every agent it starts and its temporary
directory are removed on the way out, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

if TYPE_CHECKING or __package__:  # mypy, or `python -m bench.footprint`, from the repository's root
    from bench import harness
else:  # `python bench/footprint.py` puts this folder on sys.path
    import harness

DEFAULT_MODEL = harness.REPO / "models" / "SmolLM2-135M-Instruct-Q4_1.gguf"
TINY_MODEL = harness.REPO / "tests" / "fixtures" / "tiny-llama.gguf"
SECTION = "footprint"
SECTION_BEGIN, SECTION_END = harness.markers(SECTION)
#: The section this one goes after when it is first written.
PRECEDING_SECTION = "jobs"
REPRODUCE = "`python bench/footprint.py --model models/SmolLM2-135M-Instruct-Q4_1.gguf`"

# The project's budget.
BUDGET = "An idle agent without a model stays under 80 MB of RSS."
BUDGET_MB = 80.0

MB = 1_000_000
MIB = 1 << 20
KIB = 1024  # /proc's "kB" are KiB
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
PROMPT = "Once upon a time"
COMPLETION_TOKENS = 16
#: What /proc/PID/maps paths contain when a library is mapped, by the name the table shows.
LIBRARIES = {"numpy": "/numpy/", "llama.cpp": "libllama", "onnxruntime": "onnxruntime"}

# Configurations, and the two states an agent with a model is read in.
NO_MODEL = "no_model"
FIRST_START = "first_start"
TINY = "tiny"
DEFAULT = "default"
LOADED = "loaded"
COMPLETED = "completed"

#: No proxy from the environment for loopback requests.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class Reading:
    """One reading of one agent process, in bytes; ``pss`` is None without smaps_rollup."""

    rss: int
    hwm: int
    anon: int
    pss: int | None


def proc_fields(path: Path) -> dict[str, int]:
    """The ``Name: N kB`` lines of a /proc file, in bytes."""
    fields = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * KIB
    return fields


def read_memory(pid: int) -> Reading:
    status = proc_fields(Path(f"/proc/{pid}/status"))
    pss = None
    with contextlib.suppress(OSError):
        pss = proc_fields(Path(f"/proc/{pid}/smaps_rollup")).get("Pss")
    return Reading(status["VmRSS"], status["VmHWM"], status["RssAnon"], pss)


def mapped_libraries(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [name for name, marker in LIBRARIES.items() if marker in maps]


def check_no_children(pid: int) -> None:
    """All of the agent's memory must be in the one process we read."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "children").read_text().split():
            raise RuntimeError(f"the agent (pid {pid}) has child processes; count them too")


def interpreter_rss(code: str) -> int:
    """VmRSS of a fresh interpreter that ran ``code``, as it reports it itself at the end."""
    report = "import pathlib; print(pathlib.Path('/proc/self/status').read_text())"
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\n{report}"], check=True, capture_output=True, text=True
    )
    for line in done.stdout.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    raise RuntimeError(f"no VmRSS in {done.stdout!r}")


# --------------------------------------------------------------------------- the agent


def request(agent: harness.AgentProcess, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET (or POST ``body`` as JSON) on the agent's HTTP port; the answer's JSON."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{agent.port}{path}",
        data=data,
        headers={"Content-Type": "application/json"},
    )
    with OPENER.open(req, timeout=REQUEST_TIMEOUT_S) as response:
        return json.loads(response.read())


def wait_ready(agent: harness.AgentProcess) -> None:
    """``/healthz`` answers, and the agent is past loading its model (it says so in its log)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        agent.check_alive()
        with contextlib.suppress(urllib.error.URLError, OSError):
            if request(agent, "/healthz")["status"] == "ok" and '"agent_ready"' in (
                agent.log_text()
            ):
                return
        time.sleep(0.05)
    raise TimeoutError(f"the agent is not ready after {READY_TIMEOUT_S:.0f} s:\n{agent.log_tail()}")


def complete(agent: harness.AgentProcess) -> None:
    """One short, greedy completion from the agent's one model."""
    model = request(agent, "/v1/models")["data"][0]["id"]
    body = {"model": model, "prompt": PROMPT, "max_tokens": COMPLETION_TOKENS, "temperature": 0}
    answer = request(agent, "/v1/completions", body)
    if answer["usage"]["completion_tokens"] < 1:
        raise RuntimeError(f"the completion produced no tokens: {answer}")


@dataclass(frozen=True)
class StartResult:
    """What one fresh start gave: a reading per state, and the libraries mapped at the end."""

    readings: dict[str, Reading]
    libraries: list[str]


def one_start(
    workdir: Path, model: Path | None, settle_s: float, *, restarted: bool = True
) -> StartResult:
    """Measure one agent. ``restarted`` measures its second start on the same state directory,
    the everyday case: the first start also creates the job database, and the migrations it
    runs import sqlite_utils."""
    options = [] if model is None else ["--model", str(model)]
    if restarted:
        first = harness.AgentProcess("the agent, first start", workdir, *options)
        try:
            wait_ready(first)
        finally:
            first.stop()
    agent = harness.AgentProcess("the agent", workdir, *options)
    try:
        wait_ready(agent)
        check_no_children(agent.proc.pid)
        time.sleep(settle_s)
        readings = {LOADED: read_memory(agent.proc.pid)}
        if model is not None:
            complete(agent)
            time.sleep(settle_s)
            readings[COMPLETED] = read_memory(agent.proc.pid)
        agent.check_alive()  # the readings are of the agent, not of a pid reused since
        return StartResult(readings, mapped_libraries(agent.proc.pid))
    finally:
        agent.stop()


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Row:
    """Medians over starts of one configuration in one state, in MB."""

    config: str
    state: str
    model: str
    state_label: str
    rss_mb: float
    rss_mb_p25: float
    rss_mb_p75: float
    rss_mb_max: float
    hwm_mb: float
    hwm_mb_max: float
    anon_mb: float
    pss_mb: float | None
    libraries: list[str]


def summarize(
    config: str,
    state: str,
    labels: tuple[str, str],
    readings: Sequence[Reading],
    libraries: list[str],
) -> Row:
    rss = [r.rss / MB for r in readings]
    hwm = [r.hwm / MB for r in readings]
    pss = [r.pss / MB for r in readings if r.pss is not None]
    p25, p75 = harness.quartiles(rss)
    return Row(
        config=config,
        state=state,
        model=labels[0],
        state_label=labels[1],
        rss_mb=statistics.median(rss),
        rss_mb_p25=p25,
        rss_mb_p75=p75,
        rss_mb_max=max(rss),
        hwm_mb=statistics.median(hwm),
        hwm_mb_max=max(hwm),
        anon_mb=statistics.median(r.anon / MB for r in readings),
        pss_mb=statistics.median(pss) if len(pss) == len(readings) else None,
        libraries=libraries,
    )


@dataclass(frozen=True)
class Verdict:
    row: Row

    @property
    def met(self) -> bool:
        return self.row.rss_mb_max < BUDGET_MB

    def describe(self) -> str:
        r = self.row
        margin = BUDGET_MB - r.rss_mb_max
        pss = "n/a" if r.pss_mb is None else f"{r.pss_mb:.1f} MB"
        return (
            f'"{BUDGET}" **{"met" if self.met else "missed"}**: the worse case is "{r.model}", '
            f"VmRSS {r.rss_mb:.1f} MB median "
            f"(p25..p75 {r.rss_mb_p25:.1f}..{r.rss_mb_p75:.1f}), {r.rss_mb_max:.1f} MB at most "
            f"over all starts ({r.rss_mb_max * MB / MIB:.1f} MiB), {abs(margin):.1f} MB "
            f"{'below' if margin > 0 else 'above'} the budget; the peak since start (VmHWM) "
            f"{r.hwm_mb_max:.1f} MB at most; PSS {pss} median."
        )


@dataclass(frozen=True)
class Environment(harness.Environment):
    python: str
    llama_cpp_python: str
    numpy: str


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Settings:
    model: Path
    repeats: int
    settle_s: float


@dataclass(frozen=True)
class Report:
    settings: Settings
    environment: Environment
    rows: list[Row]
    #: Why the default model's rows are missing, or None.
    skipped: str | None
    python_mb: float
    numpy_import_mb: float | None
    command: str
    readings: dict[str, list[dict[str, Reading]]]

    @property
    def verdict(self) -> Verdict:
        # Judged on the worse of the two starts without a model: "stays under" holds for both.
        without = [r for r in self.rows if r.config in (NO_MODEL, FIRST_START)]
        return Verdict(max(without, key=lambda r: r.rss_mb_max))

    def as_json(self) -> dict[str, Any]:
        return {
            "settings": harness.json_fields(self.settings),
            "environment": asdict(self.environment),
            "rows": [asdict(row) for row in self.rows],
            "skipped": self.skipped,
            "bare_python_rss_mb": self.python_mb,
            "numpy_import_rss_mb": self.numpy_import_mb,
            "readings_bytes": {
                config: [{state: asdict(r) for state, r in start.items()} for start in starts]
                for config, starts in self.readings.items()
            },
            "budget": {"budget": BUDGET, "mb": BUDGET_MB, "met": self.verdict.met},
            "command": self.command,
        }


# --------------------------------------------------------------------------- the run


def configurations(model: Path) -> tuple[dict[str, tuple[str, Path | None]], str | None]:
    """The configurations to run, by key: their label and model; and why any is skipped."""
    configs: dict[str, tuple[str, Path | None]] = {
        NO_MODEL: ("no model", None),
        FIRST_START: ("no model, first start", None),
        TINY: (TINY_MODEL.name, TINY_MODEL),
    }
    if not model.is_file():
        return configs, f"`{model.name}`: no such file (`make model` fetches the default model)"
    configs[DEFAULT] = (model.name, model)
    return configs, None


def measure(settings: Settings, command: str, progress: harness.Progress) -> Report:
    start = harness.RunStart.now()
    configs, skipped = configurations(settings.model)
    if skipped:
        progress(f"skipped {skipped}")
    keys = list(configs)
    readings: dict[str, list[dict[str, Reading]]] = {key: [] for key in keys}
    libraries: dict[str, list[str]] = {}
    with harness.temp_dir("edgelm-bench-footprint-", short=True) as base:
        for repetition in range(settings.repeats):
            shift = repetition % len(keys)  # each configuration takes every position in turn
            for key in [*keys[shift:], *keys[:shift]]:
                workdir = base / f"{key}-{repetition}"
                workdir.mkdir()
                result = one_start(
                    workdir, configs[key][1], settings.settle_s, restarted=key != FIRST_START
                )
                readings[key].append(result.readings)
                libraries[key] = result.libraries
                progress(
                    f"start {repetition + 1}/{settings.repeats} {key}: "
                    + ", ".join(f"{s} {r.rss / MB:.1f} MB" for s, r in result.readings.items())
                )
        progress("bare interpreters")
        python = [interpreter_rss("pass") for _ in range(settings.repeats)]
        numpy_mb = None
        if package_version("numpy") != "not installed":
            with_numpy = [interpreter_rss("import numpy") for _ in range(settings.repeats)]
            numpy_mb = (statistics.median(with_numpy) - statistics.median(python)) / MB
    rows = []
    for key in keys:
        label, model = configs[key]
        for state in (LOADED, COMPLETED) if model is not None else (LOADED,):
            state_label = (
                "ready" if state == LOADED else f"one {COMPLETION_TOKENS}-token completion"
            )
            samples = [start[state] for start in readings[key]]
            rows.append(summarize(key, state, (label, state_label), samples, libraries[key]))
    return Report(
        settings=settings,
        environment=Environment.measured(
            start,
            python=harness.python_version(),
            llama_cpp_python=package_version("llama_cpp_python"),
            numpy=package_version("numpy"),
        ),
        rows=rows,
        skipped=skipped,
        python_mb=statistics.median(python) / MB,
        numpy_import_mb=numpy_mb,
        command=command,
        readings=readings,
    )


# --------------------------------------------------------------------------- output


def headings(settings: Settings) -> list[str]:
    return [
        "model",
        f"idle, {settings.settle_s:g} s after",
        "VmRSS MB, median",
        "VmRSS p25..p75",
        "VmHWM MB, median",
        "PSS MB, median",
        "anonymous MB, median",
        "libraries mapped",
    ]


def cells(row: Row) -> list[str]:
    return [
        row.model,
        row.state_label,
        f"{row.rss_mb:.1f}",
        f"{row.rss_mb_p25:.1f}..{row.rss_mb_p75:.1f}",
        f"{row.hwm_mb:.1f}",
        "n/a" if row.pss_mb is None else f"{row.pss_mb:.1f}",
        f"{row.anon_mb:.1f}",
        ", ".join(row.libraries) or "none of " + ", ".join(LIBRARIES),
    ]


def rich_table(report: Report) -> Table:
    return harness.rich_table(
        "Agent memory, idle (MB = 10^6 bytes)",
        headings(report.settings),
        [cells(r) for r in report.rows],
        left=2,
    )


def context_sentence(report: Report) -> str:
    numpy = (
        "numpy is not installed"
        if report.numpy_import_mb is None
        else f"importing numpy adds {report.numpy_import_mb:.1f} MB to that"
    )
    return (
        f"For scale: a bare Python {report.environment.python} interpreter holds "
        f"{report.python_mb:.1f} MB of VmRSS, and {numpy} (medians of "
        f"{report.settings.repeats} fresh processes each)."
    )


def run_facts(report: Report) -> list[str]:
    s, env = report.settings, report.environment
    skipped = [f"- Skipped: {report.skipped}"] if report.skipped else []
    return [
        *harness.machine_facts(env),
        f"- Starts: {s.repeats} fresh agents per configuration, in rotating order, each with a "
        f"fresh state directory; readings {s.settle_s:g} s after the agent was ready (and after "
        f"the completion); the agent's default threads and context length",
        *skipped,
        f"- Python {env.python}, llama-cpp-python {env.llama_cpp_python}, numpy {env.numpy}",
        f"- This run: `{report.command}`",
        f"- Reproduce: {REPRODUCE}",
    ]


def markdown_section(report: Report) -> str:
    parts = [
        SECTION_BEGIN,
        "## Memory footprint of an idle agent (`bench/footprint.py`)",
        "",
        "The memory of a real `edgelm agent run` process, idle, without a model and, for "
        f"context, with the test suite's `{TINY_MODEL.name}` and with the default model, read "
        "from /proc/PID/status (VmRSS, its peak VmHWM, RssAnon) and /proc/PID/smaps_rollup "
        "(PSS, which divides each shared page among the processes sharing it, so it is what "
        "one more agent costs, and falls when other processes on the machine map the same "
        "files). MB = 10^6 bytes. Medians over fresh starts; the script's docstring explains "
        "the method.",
        "",
        *run_facts(report),
        "",
        *harness.caution(report.environment),
        harness.markdown_table(headings(report.settings), [cells(r) for r in report.rows], left=2),
        "",
        context_sentence(report),
        "",
        "Budget (judged on the largest VmRSS over all starts without a model):",
        "",
        f"- {report.verdict.describe()}",
        SECTION_END,
    ]
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = harness.argument_parser(
        "Memory (VmRSS, VmHWM, PSS) of an idle agent without a model, and with the tiny test "
        "model and the default model loaded."
    )
    parser.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="model for context (skipped if missing)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="fresh starts per configuration")
    parser.add_argument(
        "--settle-s", type=float, default=2.0, help="idle seconds before each reading"
    )
    harness.add_output_options(parser, json_help="print the raw readings as JSON on stdout")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.settle_s < 0:
        parser.error("need --repeats >= 1 and --settle-s >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(model=args.model.resolve(), repeats=args.repeats, settle_s=args.settle_s)
    console, log = harness.start_run(args, width=160)
    try:
        report = measure(settings, harness.this_command(), lambda message: log.log(message))
    except KeyboardInterrupt:
        log.print("interrupted; agents stopped, temporary files removed")
        return 130
    console.print(rich_table(report))
    console.print(context_sentence(report))
    if report.skipped:
        console.print(f"skipped {report.skipped.replace('`', '')}")
    console.print(report.verdict.describe().replace("**", ""))
    harness.print_caution(console, report.environment)
    harness.publish(
        args,
        console,
        SECTION,
        report.as_json,
        lambda: markdown_section(report),
        after=PRECEDING_SECTION,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
