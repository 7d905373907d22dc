"""Server-sent events, decoded from bytes as they arrive. Pure: bytes in, events out.

The control plane's ``GET /api/v1/events`` streams ``event: device|rollout|job`` with a JSON
``data:``. This decoder follows the WHATWG event-stream rules, so it does not depend on how
the server or a proxy splits its writes:

* lines end with ``\\r\\n``, ``\\n`` or ``\\r`` (a ``\\r`` at the end of one chunk and a
  ``\\n`` at the start of the next are one line end);
* ``field: value`` (one leading space after the colon is dropped); ``data`` lines accumulate,
  joined by ``\\n``; ``event`` names the type (default ``message``); ``id`` is kept unless it
  holds NUL; a line starting with ``:`` is a comment (keep-alives); other fields are ignored;
* a blank line dispatches the event, if it has data.

An event over :data:`MAX_EVENT_BYTES` raises :class:`ControlProtocolError`: a server that
never ends a line must not fill the operator's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgelm_provisioning.errors import ControlProtocolError

MAX_EVENT_BYTES = 1 << 20


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None = None


def encode_event(event: ServerSentEvent) -> bytes:
    """The wire form of one event (what a server writes; tests and fakes use it)."""
    lines = [f"event: {event.event}"]
    if event.id is not None:
        lines.append(f"id: {event.id}")
    lines.extend(f"data: {line}" for line in event.data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


class SSEDecoder:
    def __init__(self, *, url: str = "", max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._url = url
        self._max = max_event_bytes
        self._buffer = b""
        self._skip_lf = False  # the last chunk ended in \r: a \n next is the same line end
        self._event = ""
        self._data: list[str] = []
        self._size = 0
        self.last_id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Take the next bytes of the stream; return the events they complete."""
        if not chunk:
            return []
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._skip_lf = False
        self._buffer += chunk
        events: list[ServerSentEvent] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                break
            end, width = cut
            if width == 1 and self._buffer[end : end + 1] == b"\r" and end + 1 == len(self._buffer):
                self._skip_lf = True  # maybe \r\n split across chunks
            line = self._buffer[:end]
            self._buffer = self._buffer[end + width :]
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        if len(self._buffer) + self._size > self._max:
            raise ControlProtocolError(
                f"an event on the stream is over {self._max} bytes", url=self._url
            )
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._size += len(value) + 1
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self.last_id = value
        if self._size > self._max:
            raise ControlProtocolError(
                f"an event on the stream is over {self._max} bytes", url=self._url
            )
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        event = self._event or "message"
        data, had_data = "\n".join(self._data), bool(self._data)
        self._event, self._data, self._size = "", [], 0
        if not had_data:
            return None
        return ServerSentEvent(event, data, self.last_id)


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Index and width of the first line end in ``buffer``, if any."""
    cr, lf = buffer.find(b"\r"), buffer.find(b"\n")
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, 1
    if buffer[cr + 1 : cr + 2] == b"\n":
        return cr, 2
    return cr, 1
