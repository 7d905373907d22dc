"""``scripts/demo.py`` end to end, as ``make demo`` runs it, on the tiny GGUF fixture.

The demo starts a broker, the control plane and three agents, rolls the model out in two
waves, runs a remote job on all three and stops everything it started
(``--exit-when-done``). The test runs it with Mosquitto, and with the amqtt fallback (MQTT
3.1.1), and checks that no process the demo started outlives it; whatever does is killed
here, and the test fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_process import TINY_GGUF

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo.py"
DEVICES = ("kiosk-1", "kiosk-2", "kiosk-3")
RUN_TIMEOUT_S = 480  # a safety net: the demo takes about 20 s here
STOP_TIMEOUT_S = 60
# What each line of the demo's pids file may be running, to tell it from a reused pid.
COMMANDS = {"broker": ("mosquitto", "demo_broker.py"), "control": ("control",)}


def started_and_alive(root: Path) -> dict[int, str]:
    """The processes the demo started (its ``pids`` file) that are still running."""
    alive: dict[int, str] = {}
    pids_file = root / "pids"
    if not pids_file.exists():
        return alive
    for line in pids_file.read_text().splitlines():
        pid_text, name = line.split(" ", 1)
        try:
            command = Path(f"/proc/{pid_text}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone
        if any(word in command for word in COMMANDS.get(name, (str(root),))):
            alive[int(pid_text)] = name
    return alive


def end(process: subprocess.Popen[str]) -> None:
    """Stop the demo as Ctrl-C would (it then stops its children), else kill it."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 2 * STOP_TIMEOUT_S)
@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_rolls_out_runs_a_job_and_stops_everything(broker: str, short_tmp: Path):
    """Three agents end up serving the model, the job's results are printed for each, and
    nothing the demo started is left running."""
    root = short_tmp / "demo"
    command = [
        sys.executable,
        str(DEMO),
        "--model",
        str(TINY_GGUF),
        "--exit-when-done",
        "--dir",
        str(root),
        "--broker",
        broker,
    ]
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["COLUMNS"] = "200"  # the job's table is wide enough to keep each row on one line
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        end(process)
        output = (process.stdout.read() if process.stdout else "") + "\n(timed out)"
    finally:
        end(process)
        left = started_and_alive(root)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert process.returncode == 0, output
    assert left == {}, f"the demo left these running: {left}\n{output}"
    url = "?protocol=3.1.1" if broker == "amqtt" else ""
    assert f"(broker: {broker}, mqtt://127.0.0.1:" in output
    assert re.search(rf"broker: {broker}, mqtt://127\.0\.0\.1:\d+{re.escape(url)}\)", output)
    for device in DEVICES:
        assert f"{device} serves tiny-llama@1.0" in output
        assert re.search(rf"{device}\s*│\s*succeeded\s*│\s*\S", output), output
    assert "the job succeeded on 3 of 3" in output
    assert "fleet devices list --fleet-dir" in output  # how to look around
    assert "demo: stopped everything it started" in output
