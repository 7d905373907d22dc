"""paho-mqtt's network I/O on an asyncio event loop, as aiomqtt v2 runs it.

paho tells us about its socket through four callbacks (opened, closed, wants to write, no
longer wants to write); we turn them into ``add_reader``/``add_writer`` registrations, call
``loop_read``/``loop_write`` when the socket is ready, and ``loop_misc`` (keepalive pings,
the PINGRESP deadline) once a second. paho's callbacks then run on the event loop's thread.

One exception: paho's ``reconnect()`` blocks on DNS and the TCP (and TLS) handshake, so the
client runs it in an executor thread, and paho reports the new socket from that thread. Those
reports are passed to the loop with ``call_soon_threadsafe``; the loop never touches paho while
that thread runs (the client refuses every operation until CONNACK).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

# paho's own loop runs loop_misc at least this often; keepalive needs no finer resolution.
MISC_INTERVAL_S = 1.0
# abort() drains what the socket still holds before paho sees the end of the stream; each
# loop_read() handles at least one packet, and the kernel buffers hold a bounded number.
_ABORT_MAX_READS = 100_000


class PahoSocketBridge:
    """Runs one paho client's socket on one event loop. Build it on the loop's thread."""

    def __init__(
        self,
        client: paho.Client,
        loop: asyncio.AbstractEventLoop,
        on_error: Callable[[Exception], None],
    ) -> None:
        self._client = client
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._on_error = on_error
        self._reader_fd: int | None = None
        self._writer_fd: int | None = None
        self._misc_timer: asyncio.TimerHandle | None = None
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    @property
    def watching(self) -> bool:
        """True while a socket is registered with the loop or the misc timer is armed."""
        return (
            self._reader_fd is not None
            or self._writer_fd is not None
            or self._misc_timer is not None
        )

    def abort(self) -> None:
        """Close the connection now, without a DISCONNECT packet (the broker sends our will).

        Shutting the socket down makes paho's next read see the end of the stream; paho then
        closes the socket through ``on_socket_close`` and reports ``on_disconnect``, exactly as
        for a connection the network dropped. Packets already received are handled first. If
        reading raises (a callback failed on a packet, and paho would re-read that packet for
        ever), a write to the shut socket fails instead, and paho closes it the same way.
        """
        sock = self._client.socket()
        if sock is None:
            return
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):  # already reset by the peer
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            for _ in range(_ABORT_MAX_READS):
                if self._client.socket() is None:
                    return
                self._client.loop_read()
        if self._client.socket() is not None:
            self._client.disconnect()  # queues a packet, so that loop_write() writes
            with contextlib.suppress(Exception):
                self._client.loop_write()
        if self._client.socket() is not None:
            # Not reached with paho 2.2; if it ever is, at least stop the loop spinning on it.
            self.detach()

    def detach(self) -> bool:
        """Unregister everything (a safety net for stop); True if anything was still there."""
        was_watching = self.watching
        self._unwatch_reader()
        self._unwatch_writer()
        return was_watching

    # paho's socket callbacks: on the loop's thread, except while reconnect() runs

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        self._in_loop(self._watch_reader, sock.fileno())

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: SocketLike) -> None:
        # paho calls this before it closes the socket, so the fd is still ours to unregister.
        self._in_loop(self._unwatch_reader)

    def _on_socket_register_write(
        self, client: paho.Client, userdata: Any, sock: SocketLike
    ) -> None:
        self._in_loop(self._watch_writer, sock.fileno())

    def _on_socket_unregister_write(
        self, client: paho.Client, userdata: Any, sock: SocketLike
    ) -> None:
        self._in_loop(self._unwatch_writer)

    def _in_loop(self, func: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            func(*args)
        else:
            self._loop.call_soon_threadsafe(func, *args)

    # registrations

    def _watch_reader(self, fd: int) -> None:
        self._unwatch_reader()
        self._loop.add_reader(fd, self._readable)
        self._reader_fd = fd
        self._misc_timer = self._loop.call_later(MISC_INTERVAL_S, self._misc)

    def _unwatch_reader(self) -> None:
        if self._reader_fd is not None:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = None
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None
        # paho unregisters writing before it closes, but a failed write may skip that.
        self._unwatch_writer()

    def _watch_writer(self, fd: int) -> None:
        if self._writer_fd == fd:
            return
        self._unwatch_writer()
        self._loop.add_writer(fd, self._writable)
        self._writer_fd = fd

    def _unwatch_writer(self) -> None:
        if self._writer_fd is not None:
            self._loop.remove_writer(self._writer_fd)
            self._writer_fd = None

    # the loop's side: socket ready, timer due

    def _readable(self) -> None:
        try:
            self._client.loop_read()
            # TLS decrypts whole records: a packet can wait in the SSL buffer while the fd
            # stays quiet, so drain the buffer before going back to the selector.
            sock = self._client.socket()
            while isinstance(sock, ssl.SSLSocket) and sock.pending():
                self._client.loop_read()
                sock = self._client.socket()
        except Exception as exc:  # a callback of ours raised, or paho hit a bug
            self._on_error(exc)

    def _writable(self) -> None:
        try:
            self._client.loop_write()
        except Exception as exc:
            self._on_error(exc)

    def _misc(self) -> None:
        self._misc_timer = None
        try:
            self._client.loop_misc()
        except Exception as exc:
            self._on_error(exc)
        if self._reader_fd is not None and self._client.socket() is not None:
            self._misc_timer = self._loop.call_later(MISC_INTERVAL_S, self._misc)
