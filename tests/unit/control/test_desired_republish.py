"""Republishing every current desired state after a connection without a session, on a real
SQLite store: the store marks them in batches by device id, skips rows without a document,
and the director publishes each device's newest document (releases too) again, byte for byte,
once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgelm_control.clock import ManualClock
from edgelm_control.director import Assignment, Director
from edgelm_control.metrics import ControlMetrics
from edgelm_control.store import Store
from edgelm_control.store.desired import (
    get_desired,
    mark_current_unpublished,
    mark_published,
    next_sequence,
    record_desired,
    unpublished,
)
from edgelm_protocol import TargetRef, Topic
from edgelm_protocol.mqtt import ConnectionLost

TARGET = TargetRef("models/m/1/model.gguf", 10, "ab" * 32)
NEWER = TargetRef("models/m/2/model.gguf", 12, "cd" * 32)


class FakeBroker:
    """A publisher that keeps retained messages, as a broker does; ``fail_after`` publishes
    it drops the connection (every later publish fails until ``connected`` again)."""

    def __init__(self) -> None:
        self.connected = True
        self.retained: dict[str, bytes] = {}
        self.published: list[tuple[str, bytes]] = []
        self.fail_after: int | None = None

    async def publish(self, topic: Topic, payload: bytes, *, retain: bool) -> None:
        assert retain
        if self.fail_after is not None and len(self.published) >= self.fail_after:
            self.connected = False
        if not self.connected:
            raise ConnectionLost("PUBACK", "the broker went away")
        self.published.append((topic.value, payload))
        if payload:
            self.retained[topic.value] = payload
        else:
            self.retained.pop(topic.value, None)

    def lose_state(self) -> None:
        """A broker restarted without persistence: nothing retained, nothing published yet."""
        self.retained.clear()
        self.published.clear()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(f"sqlite:///{tmp_path / 'control.db'}")
    yield opened
    await opened.close()


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def director(store: Store, broker: FakeBroker) -> Director:
    return Director(
        fleet="acme",
        key=Ed25519PrivateKey.generate(),
        store=store,
        publisher=broker,
        clock=ManualClock(),
        metrics=ControlMetrics(),
        expiry_s=3600,
    )


async def issue(director: Director, store: Store, device_id: str, target: TargetRef | None) -> int:
    async with store.write() as conn:
        model = None if target is None else "m@1"
        sequence = await director.issue(conn, device_id, Assignment(model, target, "ro-1"), floor=0)
    assert sequence is not None  # None only for a revoked device
    return sequence


async def legacy_clear(store: Store, device_id: str) -> None:
    """A row without a document, published: "nothing desired" as an empty retained message,
    the way rows were stored before releases were signed."""
    async with store.write() as conn:
        sequence = await next_sequence(conn, device_id, floor=0, now_ms=1)
        await record_desired(
            conn,
            device_id,
            sequence=sequence,
            rollout_id=None,
            model=None,
            target=None,
            issued_at_s=None,
            expires_s=None,
            document=None,
            now_ms=1,
        )
        await mark_published(conn, device_id, sequence)


def topic(device_id: str) -> str:
    return f"edgelm/v1/acme/dev/{device_id}/desired"


async def documents(store: Store, *device_ids: str) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    async with store.read() as conn:
        for device_id in device_ids:
            record = await get_desired(conn, device_id)
            assert record is not None
            assert record.document is not None
            found[topic(device_id)] = record.document.encode()
    return found


class TestMarkCurrentUnpublished:
    async def test_marks_in_batches_by_device_id_and_skips_rows_without_a_document(
        self, director: Director, store: Store
    ):
        """Batches of ``limit`` in device-id order, then an empty list; a row without a
        document (an empty retained message) is neither marked nor counted."""
        for device_id in ("d3", "d1", "d5", "d2"):
            await issue(director, store, device_id, TARGET)
        await legacy_clear(store, "d4")
        assert await director.publish_pending() == 4
        batches = []
        after = None
        async with store.write() as conn:
            assert await unpublished(conn) == []
            while ids := await mark_current_unpublished(conn, after_device_id=after, limit=3):
                batches.append(ids)
                after = ids[-1]
            pending = await unpublished(conn)
            cleared = await get_desired(conn, "d4")
        assert batches == [["d1", "d2", "d3"], ["d5"]]
        assert sorted(r.device_id for r in pending) == ["d1", "d2", "d3", "d5"]
        assert cleared is not None
        assert cleared.published

    async def test_an_empty_store_marks_nothing(self, store: Store):
        async with store.write() as conn:
            assert await mark_current_unpublished(conn, after_device_id=None, limit=10) == []


class TestRepublishCurrent:
    async def test_every_current_document_is_published_again_byte_for_byte(
        self, director: Director, store: Store, broker: FakeBroker
    ):
        """After the broker lost its state, each device's newest desired state (a signed
        release too, but not an older one, nor a row without a document) is retained again,
        with the stored bytes and sequence."""
        for device_id in ("a", "b", "c", "d"):
            await issue(director, store, device_id, TARGET)
        newest = await issue(director, store, "c", NEWER)  # only c's newest counts
        await issue(director, store, "e", None)  # a release
        await legacy_clear(store, "x")
        await director.publish_pending()
        expected = await documents(store, "a", "b", "c", "d", "e")
        assert broker.retained == expected
        broker.lose_state()

        assert await director.republish_current(batch=2) == 5

        assert broker.retained == expected
        assert sorted(t for t, _ in broker.published) == sorted(expected)  # each once
        async with store.read() as conn:
            c = await get_desired(conn, "c")
            assert await unpublished(conn) == []
        assert c is not None
        assert (c.sequence, c.target) == (newest, (NEWER.path, NEWER.length, NEWER.sha256))

    async def test_a_connection_lost_midway_leaves_the_rest_to_the_next_connection(
        self, director: Director, store: Store, broker: FakeBroker
    ):
        """The marks are in the store before anything is sent, so the next connection (which
        has a session again and only publishes what is pending) sends what is left."""
        for device_id in ("a", "b", "c", "d"):
            await issue(director, store, device_id, TARGET)
        await director.publish_pending()
        expected = await documents(store, "a", "b", "c", "d")
        broker.lose_state()
        broker.fail_after = 1

        assert await director.republish_current(batch=10) == 1

        assert len(broker.retained) == 1
        broker.fail_after = None
        broker.connected = True
        assert await director.publish_pending() == 3
        assert broker.retained == expected

    async def test_nothing_to_republish_publishes_nothing(
        self, director: Director, broker: FakeBroker
    ):
        assert await director.republish_current() == 0
        assert broker.published == []
