"""Dropping duplicates: a bounded memory of the message ids a receiver has seen.

MQTT QoS 1 delivers at least once: a PUBACK lost on a reconnect makes the broker send the
message again, and a device's outbox resends whatever the control plane has not acked. So every
receiver sees some messages twice, and drops the second by its envelope id.

The memory is bounded because receivers run for months, and a window is enough: redeliveries
follow the original within one reconnect or one outbox retry, not thousands of messages later.
It forgets ids in the order it first saw them (a duplicate does not refresh an id, so a peer
that keeps resending one message cannot keep it in memory forever), and it has no clock: what
it remembers depends only on the sequence of ids. Size it above the messages one peer can have
in flight: a device's outbox batch, the control plane's ack batch.

Durable effects need more than this window: a remote job is also deduplicated by its id in the
device's job queue, and the control plane's store keeps message ids unique. This class is the
cheap first filter in front of those, and a complete one for idempotent messages (telemetry,
presence, announce).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class RecentIds:
    """The last ``capacity`` distinct message ids seen, oldest evicted first."""

    __slots__ = ("_capacity", "_ids")

    def __init__(self, capacity: int, seen: Iterable[str] = ()) -> None:
        """``seen`` restores a memory saved with ``list(recent)`` (oldest first)."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self._capacity = capacity
        # A dict keeps insertion order and finds an id in O(1); its values are unused.
        self._ids: dict[str, None] = {}
        for message_id in seen:
            self.admit(message_id)

    @property
    def capacity(self) -> int:
        return self._capacity

    def admit(self, message_id: str) -> bool:
        """Record ``message_id``; ``True`` the first time, ``False`` for a duplicate to drop."""
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        if len(self._ids) > self._capacity:
            del self._ids[next(iter(self._ids))]
        return True

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids

    def __iter__(self) -> Iterator[str]:
        """The remembered ids, oldest first."""
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"RecentIds({len(self._ids)}/{self._capacity})"
