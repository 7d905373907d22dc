"""The sd_notify protocol, spoken by real agent and control-plane processes to a real datagram
socket, as systemd would listen for it with ``Type=notify`` and ``WatchdogSec=``.

Each test binds an ``AF_UNIX``/``SOCK_DGRAM`` socket, starts the process with
``NOTIFY_SOCKET`` pointing at it and a short ``WATCHDOG_USEC``, and reads what arrives:
``STATUS=`` lines while it starts, ``READY=1`` only once it serves (checked against its own
health endpoints the moment the datagram is read), repeated ``WATCHDOG=1``, and ``STOPPING=1``
on SIGTERM. Timeouts only bound a test that would otherwise hang; nothing asserts on timing.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent_process import TINY_GGUF, AgentProcess
from tests.integration.control.control_process import ControlProcess, write_config
from tests.integration.control.fleet import make_fleet
from tests.mosquitto import Mosquitto

#: systemd's watchdog window for these processes: 0.2 s, so pings come every 0.1 s.
WATCHDOG_USEC = "200000"
#: How long to wait for the next datagram before the test fails rather than hangs.
RECV_TIMEOUT_S = 120.0


class NotifySocket:
    """The manager's end of the protocol: a bound datagram socket and the lines read from it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(RECV_TIMEOUT_S)
        self.lines: list[str] = []
        self._pending: list[str] = []

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": WATCHDOG_USEC}

    def next_line(self) -> str:
        while not self._pending:
            datagram = self.sock.recv(4096)
            self._pending.extend(line for line in datagram.decode().split("\n") if line)
        line = self._pending.pop(0)
        self.lines.append(line)
        return line

    def until(self, wanted: Callable[[str], bool]) -> str:
        """Read lines until one is ``wanted``; return it."""
        while True:
            line = self.next_line()
            if wanted(line):
                return line

    def statuses(self) -> list[str]:
        return [line.removeprefix("STATUS=") for line in self.lines if line.startswith("STATUS=")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(short_tmp: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(short_tmp / "notify.sock")
    yield listener
    listener.close()


class TestAgent:
    def test_ready_comes_once_the_model_serves_then_watchdog_then_stopping(
        self, short_tmp: Path, notify: NotifySocket
    ):
        """STATUS says it loads; READY=1 arrives when /readyz already answers 200; WATCHDOG=1
        keeps coming; SIGTERM brings STOPPING=1 and a clean exit."""
        workdir = short_tmp / "agent"
        workdir.mkdir()
        agent = AgentProcess(workdir, model=TINY_GGUF, env=notify.env())
        try:
            notify.until(lambda line: line == "READY=1")
            status, body = agent.request("GET", "/readyz")
            assert status == 200, body
            statuses = notify.statuses()
            assert statuses[0].startswith("loading"), statuses
            assert statuses[-1] == "serving tiny-llama", statuses
            for _ in range(3):  # repeated pings, from the running event loop
                notify.until(lambda line: line == "WATCHDOG=1")
            agent.signal(signal.SIGTERM)
            notify.until(lambda line: line == "STOPPING=1")
            assert agent.wait() == 0
        finally:
            agent.stop()
        assert notify.statuses()[-1].startswith("stopping"), notify.statuses()
        assert notify.lines.count("READY=1") == 1
        assert notify.lines.count("STOPPING=1") == 1

    def test_without_a_model_ready_comes_once_the_agent_is_up(
        self, short_tmp: Path, notify: NotifySocket
    ):
        """No model to serve: READY=1 once the API answers and /readyz says no_model, with a
        status that says so."""
        workdir = short_tmp / "agent"
        workdir.mkdir()
        agent = AgentProcess(workdir, model=None, env=notify.env())
        try:
            notify.until(lambda line: line == "READY=1")
            status, body = agent.request("GET", "/healthz")
            assert status == 200, body
            status, body = agent.request("GET", "/readyz")
            assert (status, body["status"]) == (503, "no_model"), body
            assert notify.statuses()[-1] == "up, no model to serve", notify.statuses()
            notify.until(lambda line: line == "WATCHDOG=1")
            agent.signal(signal.SIGTERM)
            notify.until(lambda line: line == "STOPPING=1")
            assert agent.wait() == 0
        finally:
            agent.stop()

    def test_without_notify_socket_nothing_is_sent(self, short_tmp: Path, notify: NotifySocket):
        """Not started by systemd: the agent serves as before and sends no datagram (the
        socket it could have found stays empty)."""
        workdir = short_tmp / "agent"
        workdir.mkdir()
        agent = AgentProcess(workdir, model=None, env={"WATCHDOG_USEC": WATCHDOG_USEC})
        try:
            agent.wait_alive()
            agent.signal(signal.SIGTERM)
            assert agent.wait() == 0
        finally:
            agent.stop()
        notify.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            notify.sock.recv(4096)


class TestControlPlane:
    def test_ready_once_it_listens_then_watchdog_then_stopping(
        self, short_tmp: Path, mosquitto: Mosquitto, notify: NotifySocket
    ):
        """READY=1 once the store is migrated and the API answers; WATCHDOG=1 repeats;
        SIGTERM brings STOPPING=1 and exit 0."""
        fleet = make_fleet(short_tmp / "fleet")
        config = write_config(fleet, mosquitto.port)
        process = ControlProcess(config, short_tmp / "control.log", env=notify.env())
        try:
            notify.until(lambda line: line == "READY=1")
            process.wait_ready()  # the address, from its ready line on stderr
            healthz = f"{process.url}/healthz"  # http://127.0.0.1:PORT
            with urllib.request.urlopen(healthz, timeout=10) as response:  # noqa: S310
                assert response.status == 200
            statuses = notify.statuses()
            assert statuses[0].startswith("starting"), statuses
            assert statuses[-1].startswith(f"serving fleet {fleet.name} on http://"), statuses
            for _ in range(3):
                notify.until(lambda line: line == "WATCHDOG=1")
            process.proc.send_signal(signal.SIGTERM)
            notify.until(lambda line: line == "STOPPING=1")
            assert process.wait() == 0
        finally:
            with contextlib.suppress(Exception):
                process.kill()
        assert notify.lines.count("READY=1") == 1
