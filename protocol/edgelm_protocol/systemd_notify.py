"""Tell systemd what the process is doing: sd_notify(3) ``READY=1``, ``STATUS=``, ``WATCHDOG=1``
and ``STOPPING=1``, for the agent and the control plane alike.

The datagrams are sent by `systemd-watchdog <https://pypi.org/project/systemd-watchdog/>`_
(MIT, pure Python, typed), which also reads the watchdog window as sd_watchdog_enabled(3) does
(``WATCHDOG_USEC``, for this process only when ``WATCHDOG_PID`` names it). This module is only
the shell around it: it sends each ``STATUS=`` once per change, pings the watchdog from the
event loop at half the window (a hung loop stops the pings and systemd restarts the service),
and swallows send errors, as every sd_notify caller does: a manager that went away must not stop
a daemon that still serves.

``NOTIFY_SOCKET`` and ``WATCHDOG_*`` are systemd's protocol, not settings: they are read here,
not in the configuration. Without ``NOTIFY_SOCKET`` (not started by systemd as
``Type=notify``) every method does nothing, no socket is opened and :meth:`run` returns at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

from systemd_watchdog.systemd_watchdog import WatchDog  # the package re-exports it untyped

#: How often :meth:`ServiceNotifier.run` looks for a change of status to report.
STATUS_POLL_S = 1.0


class ServiceNotifier:
    def __init__(self, address: str | None) -> None:
        """``address`` is ``NOTIFY_SOCKET``'s value (``None``: do nothing). The library reads
        ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from the environment itself."""
        self._socket: socket.socket | None = None
        self._dog: WatchDog | None = None
        self._status: str | None = None
        self._stopping = False
        self.watchdog_interval_s: float | None = None
        if not address:
            return
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._dog = WatchDog(sock=self._socket, addr=address)
        # The library keeps a 24 h window when the watchdog is off (or meant for another
        # process, by WATCHDOG_PID); ping only when it is on for this one.
        pid = os.environ.get("WATCHDOG_PID")
        on = os.environ.get("WATCHDOG_USEC") and pid in (None, str(os.getpid()))
        if on and self._dog.timeout:
            self.watchdog_interval_s = self._dog.timeout / 1e6 / 2

    @classmethod
    def from_environment(cls) -> ServiceNotifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._dog is not None

    def status(self, text: str) -> None:
        """``STATUS=text``, unless it is already the status."""
        if self._dog is None or text == self._status:
            return
        self._status = text
        self._send(lambda dog: dog.status(text))

    def ready(self, status: str | None = None) -> None:
        """The status first, so ``systemctl status`` never shows "active" with a stale line."""
        if status is not None:
            self.status(status)
        self._send(lambda dog: dog.ready())

    def stopping(self, status: str = "stopping") -> None:
        """``STOPPING=1`` once, however many shutdown paths call it."""
        if self._dog is None or self._stopping:
            return
        self._stopping = True
        self.status(status)
        # The library has no public call for STOPPING=1; its _send() is the same datagram
        # path as ready() and status() (checked by tests/integration/test_systemd_notify.py).
        self._send(lambda dog: dog._send("STOPPING=1\n"))

    def ping(self) -> None:
        """``WATCHDOG=1`` if half the window has passed since the last one."""
        self._send(lambda dog: dog.ping())

    async def run(self, describe: Callable[[], str]) -> None:
        """Until cancelled: report ``describe()`` whenever it changes, and keep the watchdog
        fed from this event loop. Returns at once when systemd is not listening."""
        if self._dog is None:
            return
        interval_s = self.watchdog_interval_s
        # Waking twice per interval, a ping is never later than 3/4 of the window.
        tick_s = STATUS_POLL_S if interval_s is None else min(STATUS_POLL_S, interval_s / 2)
        while True:
            if not self._stopping:
                self.status(describe())
            if interval_s is not None:
                self.ping()
            await asyncio.sleep(tick_s)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._dog = None

    def _send(self, send: Callable[[WatchDog], object]) -> None:
        if self._dog is None:
            return
        with contextlib.suppress(OSError):  # sd_notify(3) failures are ignored by design
            send(self._dog)
