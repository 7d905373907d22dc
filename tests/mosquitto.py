"""A real Mosquitto for tests, and a TCP relay that can cut connections like a dead network.

:class:`Mosquitto` writes its own config (a listener on a free port on 127.0.0.1, anonymous
clients, optional persistence and optional denied topics), starts ``mosquitto -c CONF`` and
waits until the port accepts. It can be stopped (SIGTERM: a persistent broker saves its
sessions), killed (SIGKILL), paused and restarted on the same port. The ``mosquitto_factory``
fixture stops every broker it started, also when the test fails. Load the fixtures with
``pytest_plugins = ("tests.mosquitto",)`` (and import this module's names for typing only, so
that pytest can rewrite its asserts). The shared broker on port 1883 is never touched.

:class:`TcpProxy` sits between a client and a broker. ``cut()`` resets every relayed
connection at once, so both ends see the connection die without a DISCONNECT: the broker
publishes the client's will, and the client reconnects through the proxy. The
``tcp_proxy`` fixture starts them and closes them after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

MOSQUITTO = "/usr/sbin/mosquitto"
DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One ``mosquitto`` process with its own port, config, log and persistence directory."""

    def __init__(
        self,
        workdir: Path,
        *,
        persistence: bool = False,
        denied_topics: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        """``denied_topics``: filters that anonymous clients may neither subscribe to nor
        publish on. Mosquitto 2.0's acl_file grants every subscription and filters at delivery
        time; the dynamic-security plugin refuses in the SUBACK (0x87), as a fleet ACL would."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port or free_port()
        self.persistence = persistence
        self.log_path = workdir / "mosquitto.log"
        self.config_path = workdir / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config(denied_topics)

    def _write_config(self, denied_topics: Sequence[str]) -> None:
        lines = [
            "per_listener_settings false",
            f"listener {self.port} {HOST}",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "log_dest stderr",  # unbuffered, unlike "log_dest file": tests read it live
            *(f"log_type {kind}" for kind in ("error", "warning", "notice", "information")),
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto drops to the "mosquitto" user, which cannot write our dir.
            lines.append("user root")
        if denied_topics:
            dynsec = self.workdir / "dynamic-security.json"
            dynsec.write_text(json.dumps(_dynsec_config(denied_topics)))
            lines += [f"plugin {DYNSEC_PLUGIN}", f"plugin_opt_config_file {dynsec}"]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, timeout_s: float = 60) -> Self:
        """Start the broker and return once its port accepts connections."""
        if self.running:
            raise RuntimeError(f"mosquitto on port {self.port} is already running")
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self._proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 1):
                return self
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"mosquitto not listening after {timeout_s}s:\n{self.logs()}")

    def stop(self, timeout_s: float = 60) -> None:
        """SIGTERM: clients see the connection close; a persistent broker saves sessions."""
        self._end(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL: the broker dies without saving anything."""
        self._end(signal.SIGKILL, 60)

    def restart(self, timeout_s: float = 60) -> Self:
        """Stop (SIGTERM) and start again on the same port, with the same config."""
        self.stop(timeout_s)
        return self.start(timeout_s)

    def pause(self) -> None:
        """SIGSTOP: the broker holds its sockets but answers nothing."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def _end(self, sig: signal.Signals, timeout_s: float) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused broker cannot handle SIGTERM
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_for_log(self, text: str, timeout_s: float = 60) -> None:
        """Wait until the broker's log contains ``text`` (it logs each client that leaves)."""
        async with asyncio.timeout(timeout_s):
            while text not in self.logs():
                await asyncio.sleep(0.02)


def _dynsec_config(denied_topics: Sequence[str]) -> dict[str, object]:
    acls = []
    for topic in denied_topics:
        acls.append({"acltype": "subscribePattern", "topic": topic, "allow": False})
        acls.append({"acltype": "publishClientSend", "topic": topic, "allow": False})
    return {
        "defaultACLAccess": {
            "publishClientSend": True,
            "publishClientReceive": True,
            "subscribe": True,
            "unsubscribe": True,
        },
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "fence"}]}],
        "roles": [{"rolename": "fence", "acls": acls}],
        "anonymousGroup": "anonymous",
    }


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start brokers for one test (keyword arguments as :class:`Mosquitto`); all stopped after."""
    brokers: list[Mosquitto] = []

    def start(**kwargs: object) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(brokers)}", **kwargs)  # type: ignore[arg-type]
        brokers.append(broker)
        return broker.start()

    yield start
    for broker in brokers:
        broker.stop(timeout_s=10)
        broker.kill()  # if it would not stop


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A plain broker: no persistence, no ACL."""
    return mosquitto_factory()


@pytest.fixture
async def tcp_proxy() -> AsyncIterator[Callable[[int], Awaitable[TcpProxy]]]:
    """Start relays to a broker port for one test; all closed after."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(target_port: int) -> TcpProxy:
            return await stack.enter_async_context(TcpProxy(target_port))

        yield start


class TcpProxy:
    """Relays TCP from a local port to the broker; ``cut()`` resets every live connection."""

    def __init__(self, target_port: int, target_host: str = HOST) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._relay, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> int:
        """Reset (RST) both sides of every relayed connection; return how many sockets."""
        writers = list(self._writers)
        for writer in writers:
            sock = writer.get_extra_info("socket")
            if sock is not None:  # linger 0: close() sends RST, as a dead network would
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self._writers.clear()
        return len(writers)

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)  # so that leaving the proxy ends this relay too
        try:
            await self._relay_to_broker(client_in, client_out)
        finally:
            if me is not None:
                self._tasks.discard(me)

    async def _relay_to_broker(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        try:
            broker_in, broker_out = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            client_out.transport.abort()
            return
        self._writers |= {client_out, broker_out}
        pumps = [
            asyncio.create_task(_pump(client_in, broker_out)),
            asyncio.create_task(_pump(broker_in, client_out)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps)
        finally:
            for pump in pumps:
                pump.cancel()
                self._tasks.discard(pump)
            for writer in (client_out, broker_out):
                self._writers.discard(writer)
                writer.transport.abort()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        # The peer closed cleanly: pass the end of stream on, so the other side sees it too.
        if sink.can_write_eof():
            sink.write_eof()
