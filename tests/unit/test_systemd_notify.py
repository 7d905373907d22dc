"""The sd_notify shell in one process, against a real datagram socket: what it sends, what it
does not send twice, when the watchdog is on, and that nothing happens without systemd. The
status lines themselves come from pure functions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgelm_agent.daemon import describe_status
from edgelm_protocol.systemd_notify import ServiceNotifier


@pytest.fixture
def manager(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, socket.socket]]:
    """The manager's socket; no watchdog unless a test sets systemd's variables."""
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    path = short_tmp / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    yield str(path), sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every line sent so far (the sends are synchronous: they are all queued already)."""
    lines: list[str] = []
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            lines += [line for line in sock.recv(4096).decode().split("\n") if line]
    sock.settimeout(10)
    return lines


class TestNotifier:
    def test_ready_status_and_stopping_reach_the_socket_in_order(self, manager):
        address, sock = manager
        notifier = ServiceNotifier(address)
        notifier.status("loading")
        notifier.status("loading")  # unchanged: not sent again
        notifier.ready("serving m")
        notifier.stopping()
        notifier.stopping()  # once, however many paths stop
        notifier.close()
        assert received(sock) == [
            "STATUS=loading",
            "STATUS=serving m",
            "READY=1",
            "STATUS=stopping",
            "STOPPING=1",
        ]

    def test_the_watchdog_is_off_without_watchdog_usec(self, manager):
        notifier = ServiceNotifier(manager[0])
        assert notifier.watchdog_interval_s is None
        notifier.close()

    def test_the_watchdog_interval_is_half_of_watchdog_usec(self, manager, monkeypatch):
        address, _ = manager
        monkeypatch.setenv("WATCHDOG_USEC", "30000000")
        notifier = ServiceNotifier(address)
        assert notifier.watchdog_interval_s == 15.0
        notifier.close()

    def test_a_watchdog_meant_for_another_process_is_not_fed(self, manager, monkeypatch):
        """sd_watchdog_enabled(3): WATCHDOG_PID names the process the watchdog is for."""
        address, _ = manager
        monkeypatch.setenv("WATCHDOG_USEC", "1000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
        notifier = ServiceNotifier(address)
        assert notifier.watchdog_interval_s is None
        notifier.close()

    async def test_run_reports_changes_and_pings(self, manager, monkeypatch):
        address, sock = manager
        monkeypatch.setenv("WATCHDOG_USEC", "20000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        notifier = ServiceNotifier(address)
        state = ["loading"]
        task = asyncio.create_task(notifier.run(lambda: state[0]))
        lines: list[str] = []
        while lines.count("WATCHDOG=1") < 2:
            lines += (await asyncio.to_thread(sock.recv, 4096)).decode().split()
        state[0] = "serving"
        while "STATUS=serving" not in lines:
            lines += (await asyncio.to_thread(sock.recv, 4096)).decode().split()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        notifier.close()
        assert lines[0] == "STATUS=loading"
        assert lines.count("STATUS=loading") == 1

    async def test_without_notify_socket_nothing_happens(self):
        notifier = ServiceNotifier(None)
        assert not notifier.enabled
        notifier.ready("x")
        notifier.stopping()
        await notifier.run(lambda: "never")  # returns at once
        notifier.close()

    def test_a_manager_that_went_away_is_ignored(self, short_tmp: Path):
        notifier = ServiceNotifier(str(short_tmp / "gone.sock"))
        notifier.ready("serving")  # ENOENT, swallowed as sd_notify(3) callers do
        notifier.close()


class TestStatusLines:
    def base(
        self,
        *,
        starting: bool = False,
        draining: bool = False,
        model_id: str | None = "smollm2",
        importing: Path | None = None,
        fleet: str | None = None,
        fleet_connected: bool | None = None,
    ) -> str:
        return describe_status(
            starting=starting,
            draining=draining,
            model_id=model_id,
            importing=importing,
            fleet=fleet,
            fleet_connected=fleet_connected,
        )

    def test_loading(self):
        assert self.base(starting=True) == "loading the active model"
        imported = self.base(starting=True, importing=Path("/m/SmolLM2.gguf"))
        assert imported == "loading: importing SmolLM2.gguf into the registry"

    def test_serving_and_no_model(self):
        assert self.base() == "serving smollm2"
        assert self.base(model_id=None) == "up, no model to serve"

    def test_fleet_devices_say_whether_they_sync(self):
        assert (
            self.base(fleet="acme", fleet_connected=True)
            == "serving smollm2; syncing with fleet acme"
        )
        offline = self.base(fleet="acme", fleet_connected=False)
        assert offline == "serving smollm2; offline from fleet acme, reconnecting"

    def test_stopping_wins(self):
        assert self.base(draining=True, starting=True).startswith("stopping")
