"""``bench/fleet.py`` on a tiny fleet, as ``make bench-fleet`` runs it on 100 to 1,000 devices.

Three simulated devices (the agent's real sync stack, in two worker processes) get the tiny
model through the benchmark's own Mosquitto and control plane, and one short telemetry
measurement runs; the JSON must show every device succeeded. A second run is stopped with
Ctrl-C (SIGINT) once its fleet is online. Both check that nothing the benchmark started (its
brokers, control planes, workers, temporary directories) outlives it. The doc is never written
(``--no-write``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "fleet.py"
TINY = ["--sizes", "3", "--processes", "2", "--idle-window-s", "1", "--no-write"]
#: What the benchmark calls its fleets' temporary directories (always under /tmp).
FLEET_PREFIX = "/tmp/edgelm-fleet-"
RUN_TIMEOUT_S = 120  # a safety net: a run takes about 15 s here
STOP_TIMEOUT_S = 60


def bench_processes(private_tmp: Path) -> dict[int, str]:
    """Running processes whose command line names one of the benchmark's temporary
    directories: its workers, brokers and control planes. The telemetry measurement makes
    its directories under ``TMPDIR``, which each test points at a folder of its own."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if FLEET_PREFIX in command or str(private_tmp) in command:
            found[int(entry.name)] = command
    return found


def temp_dirs(private_tmp: Path) -> set[Path]:
    return {*Path("/tmp").glob("edgelm-fleet-*"), *private_tmp.iterdir()}


def bench(private_tmp: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(BENCH), *TINY, *args],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(private_tmp)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def left_behind(
    private_tmp: Path, before_pids: dict[int, str], before_dirs: set[Path]
) -> tuple[dict[int, str], set[Path]]:
    """What the run left: processes (killed here) and temporary directories."""
    left = {pid: cmd for pid, cmd in bench_processes(private_tmp).items() if pid not in before_pids}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left, temp_dirs(private_tmp) - before_dirs


def finish(process: subprocess.Popen[str], timeout_s: float) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=STOP_TIMEOUT_S)
        return out, err + "\n(timed out)"


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + STOP_TIMEOUT_S + 30)
def test_every_simulated_device_succeeds_and_nothing_is_left(short_tmp: Path):
    before_pids, before_dirs = bench_processes(short_tmp), temp_dirs(short_tmp)
    process = bench(short_tmp, "--telemetry-runs", "1", "--telemetry-messages", "1000", "--json")
    out, err = finish(process, RUN_TIMEOUT_S)
    left, dirs = left_behind(short_tmp, before_pids, before_dirs)
    assert process.returncode == 0, err[-3000:]
    result = json.loads(out)  # stdout carries the JSON only
    assert result["unfinished"] == []
    (run,) = result["runs"]["3"]
    assert run["devices"] == 3
    assert sum(run["waves"]) == 3
    assert math.isfinite(run["rollout_s"])
    assert 0 < run["rollout_s"] <= run["rollout_observed_s"] + 1
    assert run["final_state"] == "completed"
    assert len(run["memory_serving"]["workers_kb"]) == 2
    assert all(run["memory_serving"]["workers_kb"])
    (telemetry,) = result["telemetry"]
    assert telemetry["database"] == "sqlite"
    assert all(rate > 0 for rate in telemetry["rates"])
    assert left == {}, f"still running: {left}"
    assert dirs == set(), f"not removed: {dirs}"


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + STOP_TIMEOUT_S + 30)
def test_ctrl_c_stops_everything_it_started(short_tmp: Path):
    before_pids, before_dirs = bench_processes(short_tmp), temp_dirs(short_tmp)
    process = bench(short_tmp, "--telemetry-runs", "0", "--idle-window-s", "60")
    lines: list[str] = []
    online = threading.Event()

    def read_progress() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if "setup: enrolled" in line:  # the fleet is online, in its idle window
                online.set()

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    try:
        assert online.wait(RUN_TIMEOUT_S), "".join(lines)[-3000:]
        assert bench_processes(short_tmp).keys() - before_pids.keys(), (
            "no worker or broker running?"
        )
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=STOP_TIMEOUT_S)
        stop_s = time.monotonic() - started
        reader.join(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    left, dirs = left_behind(short_tmp, before_pids, before_dirs)
    output = "".join(lines)
    assert process.returncode == 130, output[-3000:]
    assert "interrupted" in output
    assert stop_s < 30, f"stopping took {stop_s:.1f} s"
    assert left == {}, f"still running: {left}"
    assert dirs == set(), f"not removed: {dirs}"
