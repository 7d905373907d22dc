"""The MQTT adapter against a real Mosquitto: acks, sessions, reconnects, wills, lifecycle.

Every broker is started by the ``mosquitto_factory`` fixture on a free port (never the shared
one on 1883). Waits have generous deadlines as a safety net only; no test measures time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from edgelm_protocol.mqtt import (
    AckTimeout,
    ClientStateError,
    ConnectionInfo,
    ConnectionLost,
    FailureLogThrottle,
    InboundMessage,
    InvalidArgument,
    MqttClient,
    MqttSettings,
    MqttVersion,
    MqttWill,
    NotConnected,
    PublishRefused,
    ReconnectBackoff,
    SubscribeRefused,
)
from edgelm_protocol.mqtt.link import wait_for_ack
from tests.mosquitto import free_port

if TYPE_CHECKING:
    from tests.mosquitto import Mosquitto


DEADLINE_S = 60.0  # a safety net for slow CI machines, never a measurement
REPO = Path(__file__).resolve().parents[2]
PRESENCE = "edgelm/v1/acme/dev/kiosk-17/presence"
JOBS = "edgelm/v1/acme/dev/kiosk-17/jobs"
NOT_AUTHORIZED = 0x87


def settings(port: int, client_id: str, **overrides: Any) -> MqttSettings:
    """Test settings: fast reconnects (the backoff still doubles), generous timeouts."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": client_id,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "connect_timeout_s": DEADLINE_S,
        "operation_timeout_s": DEADLINE_S,
    } | overrides
    return MqttSettings(**values)


async def next_message(messages: AsyncIterator[InboundMessage]) -> InboundMessage:
    async with asyncio.timeout(DEADLINE_S):
        return await anext(messages)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not condition():
            await asyncio.sleep(0.01)


def open_sockets() -> set[tuple[int, str]]:
    """This process's open sockets, as (fd, "socket:[inode]") pairs."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            continue  # the directory listing's own fd, closed by now
        if target.startswith("socket:"):
            found.add((int(name), target))
    return found


class Recorder:
    """An on_connect hook that records each connection and (re)subscribes when needed."""

    def __init__(self, subscriptions: list[tuple[str, int]] | None = None) -> None:
        self.subscriptions = subscriptions or []
        self.connections: list[ConnectionInfo] = []
        self.client: MqttClient | None = None

    async def __call__(self, info: ConnectionInfo) -> None:
        self.connections.append(info)
        if self.subscriptions and not info.session_present:
            assert self.client is not None
            await self.client.subscribe(self.subscriptions)


def device(port: int, hook: Recorder, client_id: str = "kiosk-17", **kw: Any) -> MqttClient:
    client = MqttClient(settings(port, client_id, **kw), on_connect=hook)
    hook.client = client
    return client


class TestPublish:
    async def test_qos1_publish_returns_after_puback_and_the_message_arrives(self, mosquitto):
        """A QoS 1 publish returns once the broker has acknowledged it, and subscribers get it."""
        async with (
            MqttClient(settings(mosquitto.port, "observer")) as observer,
            MqttClient(settings(mosquitto.port, "publisher")) as publisher,
        ):
            await observer.wait_connected()
            await observer.subscribe([("t/a", 1)])
            await publisher.wait_connected()
            await publisher.publish("t/a", b"hello", qos=1)
            message = await next_message(observer.messages())
        assert (message.topic, message.payload, message.qos) == ("t/a", b"hello", 1)

    async def test_publish_while_disconnected_raises_not_connected(self, mosquitto):
        """Publishing without a connection raises NotConnected at once; nothing is queued."""
        async with MqttClient(settings(mosquitto.port, "p")) as client:
            await client.wait_connected()
            mosquitto.stop()
            await until(lambda: not client.connected)
            with pytest.raises(NotConnected) as caught:
                await client.publish("t/a", b"kept by the caller's outbox")
        assert caught.value.operation == "publish"

    async def test_refused_publish_raises_publish_refused(self, mosquitto_factory):
        """A PUBACK with a failure reason raises PublishRefused carrying the reason code."""
        broker = mosquitto_factory(denied_topics=["secret/#"])
        async with MqttClient(settings(broker.port, "p")) as client:
            await client.wait_connected()
            with pytest.raises(PublishRefused) as caught:
                await client.publish("secret/x", b"no")
            await client.publish("open/x", b"yes")  # the connection is still good
        assert (caught.value.reason_code, caught.value.topic) == (NOT_AUTHORIZED, "secret/x")

    async def test_connection_drop_before_puback_raises_connection_lost(self, mosquitto, tcp_proxy):
        """A connection that dies before the PUBACK fails the publish; a retry then succeeds."""
        proxy = await tcp_proxy(mosquitto.port)
        async with MqttClient(settings(proxy.port, "p")) as client:
            await client.wait_connected()
            mosquitto.pause()  # the PUBACK cannot come
            publishing = asyncio.create_task(client.publish("t/a", b"m1"))
            await asyncio.sleep(0)  # let it send and start waiting
            proxy.cut()
            with pytest.raises(ConnectionLost) as caught:
                await asyncio.wait_for(publishing, DEADLINE_S)
            mosquitto.resume()
            await client.wait_connected()
            await client.publish("t/a", b"m1")
        assert caught.value.packet == "PUBACK"

    async def test_wildcard_topic_raises_invalid_argument(self, mosquitto):
        """A topic name with a wildcard is the caller's bug: InvalidArgument, nothing sent."""
        async with MqttClient(settings(mosquitto.port, "p")) as client:
            await client.wait_connected()
            with pytest.raises(InvalidArgument) as caught:
                await client.publish("t/+", b"x")
        assert caught.value.name == "topic"


class TestSubscribe:
    async def test_subscribe_then_receive_with_every_field(self, mosquitto):
        """subscribe returns the granted QoS, and messages come with topic, payload and flags."""
        async with (
            MqttClient(settings(mosquitto.port, "sub")) as subscriber,
            MqttClient(settings(mosquitto.port, "pub")) as publisher,
        ):
            await subscriber.wait_connected()
            granted = await subscriber.subscribe([("t/#", 1), ("u/+", 0)])
            await publisher.wait_connected()
            await publisher.publish("t/x/y", b"\x00\xff", qos=1)
            message = await next_message(subscriber.messages())
        assert granted == (1, 0)
        assert (message.topic, message.payload, message.qos) == ("t/x/y", b"\x00\xff", 1)
        assert (message.retain, message.duplicate, message.connection_id) == (False, False, 1)

    async def test_refused_filter_raises_subscribe_refused_and_others_hold(self, mosquitto_factory):
        """A SUBACK refusal (0x87) raises SubscribeRefused naming the filter; the rest hold."""
        broker = mosquitto_factory(denied_topics=["secret/#"])
        async with MqttClient(settings(broker.port, "sub")) as client:
            await client.wait_connected()
            with pytest.raises(SubscribeRefused) as caught:
                await client.subscribe([("open/#", 1), ("secret/#", 1)])
            await client.publish("open/a", b"still subscribed")
            message = await next_message(client.messages())
        assert caught.value.refused == {"secret/#": NOT_AUTHORIZED}
        assert message.payload == b"still subscribed"

    async def test_malformed_filter_raises_invalid_argument(self, mosquitto):
        """A filter with '#' not at the end is refused before it reaches the broker."""
        async with MqttClient(settings(mosquitto.port, "sub")) as client:
            await client.wait_connected()
            with pytest.raises(InvalidArgument) as caught:
                await client.subscribe([("a/#/b", 1)])
            assert client.connected
        assert caught.value.name == "filter"


class TestManualAck:
    async def test_unacked_message_comes_back_after_restart_and_acked_one_does_not(self, mosquitto):
        """Not acked: redelivered to the next client with the same id; acked: never again."""
        async with MqttClient(settings(mosquitto.port, "cp")) as control:
            await control.wait_connected()
            async with device(mosquitto.port, Recorder([(JOBS, 1)])) as first:
                await first.wait_connected()
                await control.publish(JOBS, b"job-1")
                assert (await next_message(first.messages())).payload == b"job-1"
            # stopped without acking: the broker still owes job-1 to this session
            async with device(mosquitto.port, Recorder([(JOBS, 1)])) as second:
                again = await next_message(second.messages())
                assert second.ack(again)
            async with device(mosquitto.port, Recorder([(JOBS, 1)])) as third:
                await third.wait_connected()
                await control.publish(JOBS, b"job-2")
                after_ack = await next_message(third.messages())
        assert (again.payload, again.duplicate) == (b"job-1", True)
        assert after_ack.payload == b"job-2"  # job-1 would have come first

    async def test_unacked_message_comes_back_after_the_connection_is_cut(
        self, mosquitto, tcp_proxy
    ):
        """After a dropped connection the same client gets the message again, to ack it then."""
        proxy = await tcp_proxy(mosquitto.port)
        async with (
            MqttClient(settings(mosquitto.port, "cp")) as control,
            device(proxy.port, Recorder([(JOBS, 1)])) as client,
        ):
            await control.wait_connected()
            await client.wait_connected()
            messages = client.messages()
            await control.publish(JOBS, b"job-1")
            first = await next_message(messages)
            proxy.cut()
            second = await next_message(messages)
            stale_ack = client.ack(first)
            fresh_ack = client.ack(second)
            double_ack = client.ack(second)
        assert (first.payload, second.payload, second.duplicate) == (b"job-1", b"job-1", True)
        assert second.connection_id > first.connection_id
        assert (stale_ack, fresh_ack, double_ack) == (False, True, False)

    async def test_receive_maximum_holds_further_messages_at_the_broker_until_an_ack(
        self, mosquitto
    ):
        """With receive_maximum unacked, the broker holds the next QoS 1 message until an ack."""
        hook = Recorder([(JOBS, 1), ("t/marker", 0)])
        async with (
            MqttClient(settings(mosquitto.port, "cp")) as control,
            device(mosquitto.port, hook, receive_maximum=2) as client,
        ):
            await control.wait_connected()
            await client.wait_connected()
            for n in (1, 2, 3):
                await control.publish(JOBS, f"job-{n}".encode())
            messages = client.messages()
            first, second = await next_message(messages), await next_message(messages)
            await control.publish("t/marker", b"qos0", qos=0)  # QoS 0 is not held back
            overtaking = await next_message(messages)
            client.ack(first)
            released = await next_message(messages)
        received = [m.payload for m in (first, second, overtaking, released)]
        assert received == [b"job-1", b"job-2", b"qos0", b"job-3"]

    async def test_qos0_and_auto_ack_messages_need_no_ack(self, mosquitto):
        """ack() sends nothing for QoS 0, nor when paho acknowledged on receipt."""
        async with (
            MqttClient(settings(mosquitto.port, "auto", manual_ack=False)) as auto,
            MqttClient(settings(mosquitto.port, "pub")) as publisher,
        ):
            await auto.wait_connected()
            await auto.subscribe([("t/a", 1)])
            await publisher.wait_connected()
            await publisher.publish("t/a", b"q0", qos=0)
            await publisher.publish("t/a", b"q1", qos=1)
            messages = auto.messages()
            q0, q1 = await next_message(messages), await next_message(messages)
            assert (auto.ack(q0), auto.ack(q1)) == (False, False)
        assert (q0.qos, q1.qos) == (0, 1)


class TestSession:
    async def test_messages_published_while_offline_arrive_after_reconnect(self, mosquitto):
        """The broker queues QoS 1 messages for a stopped client and delivers them on return."""
        hook = Recorder([(JOBS, 1)])
        async with device(mosquitto.port, hook) as client:
            await client.wait_connected()
        async with MqttClient(settings(mosquitto.port, "cp")) as control:
            await control.wait_connected()
            for n in range(3):
                await control.publish(JOBS, f"job-{n}".encode())
        async with device(mosquitto.port, hook) as client:
            # The queued messages may all be read before the hook has run for this
            # connection; wait for it, or stop() could cancel the connection before it does.
            await client.wait_connected()
            messages = client.messages()
            payloads = [(await next_message(messages)).payload for _ in range(3)]
        assert [c.session_present for c in hook.connections] == [False, True]
        assert payloads == [b"job-0", b"job-1", b"job-2"]

    async def test_clean_start_discards_the_session(self, mosquitto):
        """clean_start=True starts with no session, so nothing queued for the old one arrives."""
        async with device(mosquitto.port, Recorder([(JOBS, 1)])) as client:
            await client.wait_connected()
        hook = Recorder([(JOBS, 1)])
        async with MqttClient(settings(mosquitto.port, "cp")) as control:
            await control.wait_connected()
            await control.publish(JOBS, b"queued for the old session")
            async with device(mosquitto.port, hook, clean_start=True) as client:
                await client.wait_connected()
                await control.publish(JOBS, b"fresh")
                message = await next_message(client.messages())
        assert hook.connections[0].session_present is False
        assert message.payload == b"fresh"


class TestReconnect:
    async def test_reconnects_with_backoff_after_broker_restart_and_keeps_session(
        self, mosquitto_factory
    ):
        """With the broker down the client retries with growing backoff, then resumes."""
        broker = mosquitto_factory(persistence=True)
        hook = Recorder([(JOBS, 1)])
        with capture_logs() as logs:
            async with device(broker.port, hook) as client:
                await client.wait_connected()
                broker.stop()
                await until(lambda: sum(e["event"] == "mqtt_connect_failed" for e in logs) >= 3)
                broker.start()
                await until(lambda: len(hook.connections) == 2)
                await client.wait_connected()
                async with MqttClient(settings(broker.port, "cp")) as control:
                    await control.wait_connected()
                    await control.publish(JOBS, b"after restart")
                message = await next_message(client.messages())
        failures = [e for e in logs if e["event"] == "mqtt_connect_failed"]
        streak = [e["failures"] for e in failures]
        assert streak == list(range(streak[0], streak[0] + len(streak)))  # each one counted
        assert all(0.05 <= e["retry_in_s"] <= 0.5 for e in failures)
        assert failures[0]["log_level"] == "warning"
        assert hook.connections[1].session_present is True  # persistence kept it
        assert message.payload == b"after restart"

    async def test_lost_session_is_reported_so_the_hook_resubscribes(self, mosquitto):
        """A broker that forgot the session says so; the hook subscribes again, messages flow."""
        hook = Recorder([(JOBS, 1)])
        async with device(mosquitto.port, hook) as client:
            await client.wait_connected()
            mosquitto.restart()  # no persistence: every session is gone
            await until(lambda: len(hook.connections) == 2)
            await client.wait_connected()
            async with MqttClient(settings(mosquitto.port, "cp")) as control:
                await control.wait_connected()
                await control.publish(JOBS, b"resubscribed")
            message = await next_message(client.messages())
        assert [c.session_present for c in hook.connections] == [False, False]
        assert message.payload == b"resubscribed"

    async def test_failing_hook_reconnects_and_runs_again(self, mosquitto):
        """A hook that raises ends that connection; the next one runs the hook again."""
        calls: list[ConnectionInfo] = []

        async def flaky(info: ConnectionInfo) -> None:
            calls.append(info)
            if len(calls) == 1:
                raise RuntimeError("resubscribe failed")

        with capture_logs() as logs:
            async with MqttClient(settings(mosquitto.port, "d"), on_connect=flaky) as client:
                await client.wait_connected()
        assert [c.connection_id for c in calls] == [1, 2]
        assert [e["event"] for e in logs].count("mqtt_on_connect_failed") == 1

    async def test_on_disconnect_pairs_with_every_connection_the_hook_saw(self, mosquitto):
        """Each connection that ran the hook ends with one on_disconnect, in order, also one
        whose hook failed: a caller keeps its own "online" flag from these two, never by
        polling ``connected`` (false until the hook returns)."""
        trail: list[str] = []

        async def hook(info: ConnectionInfo) -> None:
            trail.append(f"up {info.connection_id}")
            await asyncio.sleep(0.05)  # a poll here would see connected False
            if info.connection_id == 1:
                raise RuntimeError("resubscribe failed")

        client = MqttClient(
            settings(mosquitto.port, "d"),
            on_connect=hook,
            on_disconnect=lambda: trail.append("down"),
        )
        async with client:
            await client.wait_connected()
            assert trail == ["up 1", "down", "up 2"]
            mosquitto.restart()
            await until(lambda: trail.count("up 3") == 1)
            await client.wait_connected()
        assert trail == ["up 1", "down", "up 2", "down", "up 3", "down"]  # stop() ends the last

    async def test_hook_still_running_when_the_link_drops_is_cancelled(self, mosquitto, tcp_proxy):
        """A hook stuck when its connection dies is cancelled; the next connection goes on."""
        stuck = asyncio.Event()
        cancelled: list[int] = []

        async def hook(info: ConnectionInfo) -> None:
            if info.connection_id == 1:
                stuck.set()
                try:
                    await asyncio.Event().wait()  # never set
                except asyncio.CancelledError:
                    cancelled.append(info.connection_id)
                    raise

        proxy = await tcp_proxy(mosquitto.port)
        async with MqttClient(settings(proxy.port, "d"), on_connect=hook) as client:
            await asyncio.wait_for(stuck.wait(), DEADLINE_S)
            proxy.cut()
            await client.wait_connected()
        assert cancelled == [1]


class TestWill:
    async def test_will_is_published_when_the_connection_dies_uncleanly(self, mosquitto, tcp_proxy):
        """A connection reset without DISCONNECT makes the broker publish the will."""
        will = MqttWill(topic=PRESENCE, payload=b"offline")
        proxy = await tcp_proxy(mosquitto.port)
        async with MqttClient(settings(mosquitto.port, "cp")) as observer:
            await observer.wait_connected()
            await observer.subscribe([(PRESENCE, 1)])
            async with device(proxy.port, Recorder(), will=will) as client:
                await client.wait_connected()
                await client.publish(PRESENCE, b"online", retain=True)
                presence = observer.messages()
                online = await next_message(presence)
                proxy.cut()
                offline = await next_message(presence)
        assert (online.payload, offline.payload) == (b"online", b"offline")

    async def test_clean_stop_does_not_publish_the_will(self, mosquitto):
        """stop() sends DISCONNECT 0x00: the broker deletes the will instead of sending it."""
        will = MqttWill(topic=PRESENCE, payload=b"offline")
        async with MqttClient(settings(mosquitto.port, "cp")) as observer:
            await observer.wait_connected()
            await observer.subscribe([(PRESENCE, 1)])
            async with device(mosquitto.port, Recorder(), will=will) as client:
                await client.wait_connected()
            await mosquitto.wait_for_log("Client kiosk-17 disconnected")
            await observer.publish(PRESENCE, b"marker")
            first = await next_message(observer.messages())
        assert first.payload == b"marker"  # a will would have come before it

    async def test_stop_with_send_will_publishes_the_will(self, mosquitto):
        """stop(send_will=True) sends DISCONNECT 0x04, and the broker publishes the will."""
        will = MqttWill(topic=PRESENCE, payload=b"offline")
        async with MqttClient(settings(mosquitto.port, "cp")) as observer:
            await observer.wait_connected()
            await observer.subscribe([(PRESENCE, 1)])
            client = device(mosquitto.port, Recorder(), will=will)
            await client.start()
            await client.wait_connected()
            await client.stop(send_will=True)
            message = await next_message(observer.messages())
        assert message.payload == b"offline"


class TestLifecycle:
    async def test_stop_leaves_no_socket_registration_or_task_behind(self, mosquitto):
        """After stop() the socket is closed, the loop watches nothing, no task is left."""
        loop = asyncio.get_running_loop()
        before = open_sockets()
        client = MqttClient(settings(mosquitto.port, "d"))
        await client.start()
        await client.wait_connected()
        await client.subscribe([("t/a", 1)])
        await client.publish("t/a", b"x")
        opened = open_sockets() - before
        await client.stop()
        still_open = opened & open_sockets()
        watched = [fd for fd, _ in opened if loop.remove_reader(fd) or loop.remove_writer(fd)]
        assert opened  # the connection's socket was there to leak
        assert (still_open, watched) == (set(), [])
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert not client.connected

    async def test_queued_messages_are_readable_after_stop_then_iteration_ends(self, mosquitto):
        """Nothing queued is dropped by stop(): the iterator yields it, then ends."""
        async with MqttClient(settings(mosquitto.port, "d")) as client:
            await client.wait_connected()
            await client.subscribe([("t/a", 1)])
            await client.publish("t/a", b"queued")
            await until(lambda: len(client.messages()) == 1)
        payloads = [m.payload async for m in client.messages()]
        assert payloads == [b"queued"]

    async def test_calls_outside_the_running_state_raise_client_state_error(self, unused_tcp_port):
        """publish before start, a second start, and calls after stop are usage errors."""
        client = MqttClient(settings(unused_tcp_port, "d"))  # nothing listens there
        with pytest.raises(ClientStateError):
            await client.publish("t/a", b"x")
        await client.start()
        with pytest.raises(ClientStateError):
            await client.start()
        waiting = asyncio.create_task(client.wait_connected())
        await client.stop()
        with pytest.raises(ClientStateError):
            await waiting
        with pytest.raises(ClientStateError) as caught:
            await client.subscribe([("t/a", 1)])
        assert (caught.value.operation, caught.value.state) == ("subscribe", "stopped")

    async def test_stop_before_start_and_twice_is_harmless(self, unused_tcp_port):
        """stop() on a new client, and a second stop(), return quietly."""
        client = MqttClient(settings(unused_tcp_port, "d"))
        await client.stop()
        await client.stop()
        assert [m async for m in client.messages()] == []


class TestWaitForAck:
    async def test_cancel_arriving_with_the_reply_still_cancels(self):
        """A cancel in the loop iteration that brings the reply wins; nothing swallows it."""
        reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        waiting = asyncio.create_task(wait_for_ack(reply, "CONNACK", DEADLINE_S))
        await asyncio.sleep(0)  # it is waiting now
        reply.set_result("accepted")
        # stop() cancelling the reconnect loop as the CONNACK lands; Python 3.11's
        # asyncio.wait_for returned the reply here and the loop ran on, so stop() hung.
        waiting.cancel()
        await asyncio.wait([waiting])
        assert waiting.cancelled()

    async def test_no_reply_raises_ack_timeout_naming_the_packet(self):
        """Without a reply the wait ends in AckTimeout for that packet; the wait is dropped."""
        reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        with pytest.raises(AckTimeout) as caught:
            await wait_for_ack(reply, "PUBACK", 0.01)
        assert (caught.value.packet, reply.cancelled()) == ("PUBACK", True)


class TestReconnectBackoff:
    @given(attempt=st.integers(min_value=0, max_value=10_000), seed=st.integers())
    def test_delay_stays_between_the_floor_and_the_doubling_ceiling(self, attempt, seed):
        """Every pause lies in [min_s, min(max_s, min_s * 2**(attempt+1))]."""
        backoff = ReconnectBackoff(0.5, 60.0, random.Random(seed))
        delay = backoff.delay_s(attempt)
        assert 0.5 <= delay <= min(60.0, 0.5 * 2 ** min(attempt + 1, 62))

    @given(attempt=st.integers(min_value=0, max_value=100))
    def test_ceiling_grows_until_the_cap(self, attempt):
        """The longest pause never shrinks as failures add up, and never passes max_s."""
        backoff = ReconnectBackoff(1.0, 120.0)
        assert backoff.ceiling_s(attempt) <= backoff.ceiling_s(attempt + 1) <= 120.0

    def test_failure_log_throttle_lets_one_through_per_interval_with_a_count(self):
        """The first failure is logged; the next ones wait an interval and carry a count."""
        throttle = FailureLogThrottle(60.0)
        seen = [throttle.admit(t) for t in (0.0, 1.0, 2.0, 61.0, 62.0)]
        throttle.reset()
        assert seen == [0, None, None, 2, None]
        assert throttle.admit(63.0) == 0


class TestSettings:
    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("port", 0),
            ("client_id", ""),
            ("receive_maximum", 0),
            ("session_expiry_s", -1),
            ("reconnect_max_s", 0.01),
        ],
    )
    def test_out_of_range_setting_raises_invalid_argument(self, field, value):
        """A setting out of range is refused when the settings are made, naming the field."""
        values: dict[str, Any] = {"host": "broker", "client_id": "d", field: value}
        with pytest.raises(InvalidArgument) as caught:
            MqttSettings(**values)
        assert caught.value.name == field

    def test_defaults_keep_a_persistent_seven_day_session_with_manual_acks(self):
        """The defaults resume sessions, keep them a week, and ack only on request."""
        s = MqttSettings(host="broker", client_id="kiosk-17")
        assert (s.clean_start, s.session_expiry_s, s.manual_ack) == (False, 604_800, True)


class TestMosquitto:
    def test_restart_keeps_the_port_and_kill_leaves_no_process(self, mosquitto_factory):
        """restart() comes back on the same port with a new process; kill() ends it."""
        broker: Mosquitto = mosquitto_factory(persistence=True)
        port, first_pid = broker.port, broker.pid
        broker.restart()
        restarted = (broker.port, broker.running, broker.pid != first_pid)
        broker.kill()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S).close()
        assert restarted == (port, True, True)
        assert not broker.running


def v311(port: int, client_id: str, **overrides: Any) -> MqttSettings:
    """Test settings for a client that speaks MQTT 3.1.1 (``?protocol=3.1.1``)."""
    return settings(port, client_id, protocol_version=MqttVersion.V311, **overrides)


def device311(port: int, hook: Recorder, client_id: str = "kiosk-17", **kw: Any) -> MqttClient:
    client = MqttClient(v311(port, client_id, **kw), on_connect=hook)
    hook.client = client
    return client


class TestMqtt311:
    """The same client speaking MQTT 3.1.1 (for brokers that speak nothing newer), against a
    real Mosquitto; Mosquitto's log line for each CONNECT shows the protocol (p2 is 3.1.1,
    p5 is MQTT 5) and the clean-session flag (c0: persistent)."""

    async def test_connect_subscribe_publish_qos1_and_ack(self, mosquitto):
        """3.1.1 on the wire, a persistent session, SUBACK grants, PUBACK, manual ack."""
        hook = Recorder([(JOBS, 1), ("t/qos0", 0)])
        async with (
            device311(mosquitto.port, hook) as client,
            MqttClient(v311(mosquitto.port, "cp")) as control,
        ):
            await client.wait_connected()
            await control.wait_connected()
            granted = await client.subscribe([("t/more", 1)])
            await control.publish(JOBS, b"job-1", qos=1)  # returns on the PUBACK
            message = await next_message(client.messages())
            acked = client.ack(message)
        await mosquitto.wait_for_log("Client kiosk-17 disconnected")
        assert granted == (1,)
        assert (message.topic, message.payload, message.qos) == (JOBS, b"job-1", 1)
        assert acked is True
        assert [c.session_present for c in hook.connections] == [False]
        assert "as kiosk-17 (p2, c0, k60)" in mosquitto.logs()
        assert "as cp (p2, c0, k60)" in mosquitto.logs()

    async def test_clean_start_is_the_clean_session_flag(self, mosquitto):
        """clean_start=True connects with clean session (c1): no session survives."""
        async with MqttClient(v311(mosquitto.port, "d", clean_start=True)) as client:
            await client.wait_connected()
        assert "as d (p2, c1, k60)" in mosquitto.logs()

    async def test_unacked_message_comes_back_and_acked_one_does_not(self, mosquitto):
        """Manual acks hold in 3.1.1: not acked, the next client of the session gets it again."""
        async with MqttClient(v311(mosquitto.port, "cp")) as control:
            await control.wait_connected()
            async with device311(mosquitto.port, Recorder([(JOBS, 1)])) as first:
                await first.wait_connected()
                await control.publish(JOBS, b"job-1")
                assert (await next_message(first.messages())).payload == b"job-1"
            async with device311(mosquitto.port, Recorder([(JOBS, 1)])) as second:
                again = await next_message(second.messages())
                assert second.ack(again)
            async with device311(mosquitto.port, Recorder([(JOBS, 1)])) as third:
                await third.wait_connected()
                await control.publish(JOBS, b"job-2")
                after_ack = await next_message(third.messages())
        assert (again.payload, again.duplicate) == (b"job-1", True)
        assert after_ack.payload == b"job-2"

    async def test_reconnect_after_broker_restart_resumes_the_persistent_session(
        self, mosquitto_factory
    ):
        """With the broker restarted (persistence on), the client reconnects by itself, the
        session is present, subscriptions hold without a new SUBSCRIBE, and what was queued
        while the device was away arrives."""
        broker = mosquitto_factory(persistence=True)
        hook = Recorder([(JOBS, 1)])
        async with device311(broker.port, hook) as client:
            await client.wait_connected()
            broker.stop()
            await until(lambda: not client.connected)
            broker.start()
            await until(lambda: len(hook.connections) == 2)
            await client.wait_connected()
            async with MqttClient(v311(broker.port, "cp")) as control:
                await control.wait_connected()
                await control.publish(JOBS, b"after restart")
            live = await next_message(client.messages())
            client.ack(live)
        async with MqttClient(v311(broker.port, "cp")) as control:
            await control.wait_connected()
            for n in range(3):
                await control.publish(JOBS, f"queued-{n}".encode())
        async with device311(broker.port, hook) as client:
            await client.wait_connected()
            messages = client.messages()
            queued = [(await next_message(messages)).payload for _ in range(3)]
        assert [c.session_present for c in hook.connections] == [False, True, True]
        assert live.payload == b"after restart"
        assert queued == [b"queued-0", b"queued-1", b"queued-2"]

    async def test_clean_stop_deletes_the_will_and_send_will_publishes_it(self, mosquitto):
        """3.1.1's DISCONNECT always deletes the will: stop() sends it; stop(send_will=True)
        closes the connection without it, so the broker publishes the will."""
        will = MqttWill(topic=PRESENCE, payload=b"offline")
        async with MqttClient(v311(mosquitto.port, "cp")) as observer:
            await observer.wait_connected()
            await observer.subscribe([(PRESENCE, 1)])
            presence = observer.messages()
            async with device311(mosquitto.port, Recorder(), will=will) as client:
                await client.wait_connected()
            await mosquitto.wait_for_log("Client kiosk-17 disconnected")
            await observer.publish(PRESENCE, b"marker")
            first = await next_message(presence)
            client = device311(mosquitto.port, Recorder(), will=will)
            await client.start()
            await client.wait_connected()
            await client.stop(send_will=True)
            second = await next_message(presence)
        assert (first.payload, second.payload) == (b"marker", b"offline")

    async def test_shared_subscriptions_are_refused_before_the_broker(self, mosquitto):
        """$share/... is MQTT 5 only; a 3.1.1 broker would take it for a plain filter."""
        async with MqttClient(v311(mosquitto.port, "cp")) as client:
            await client.wait_connected()
            with pytest.raises(InvalidArgument, match="shared subscriptions need MQTT 5"):
                await client.subscribe([("$share/cp/edgelm/v1/acme/dev/+/events", 1)])
            assert client.connected

    async def test_mqtt5_and_311_clients_talk_through_one_broker(self, mosquitto):
        """A 3.1.1 device and an MQTT 5 control plane exchange QoS 1 messages both ways."""
        async with (
            device311(mosquitto.port, Recorder([(JOBS, 1)])) as device_side,
            MqttClient(settings(mosquitto.port, "cp")) as control,
        ):
            await device_side.wait_connected()
            await control.wait_connected()
            await control.subscribe([(PRESENCE, 1)])
            await control.publish(JOBS, b"to the device")
            await device_side.publish(PRESENCE, b"to the control plane")
            down = await next_message(device_side.messages())
            up = await next_message(control.messages())
        assert (down.payload, up.payload) == (b"to the device", b"to the control plane")
        assert "as cp (p5, c0, k60)" in mosquitto.logs()


@pytest.fixture
def amqtt_broker() -> Iterator[int]:
    """scripts/demo_broker.py (amqtt, the demo's fallback broker) on a free port; stopped,
    and killed if it will not stop, after the test."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "demo_broker.py"), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "amqtt did not listen in time"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


class TestAmqtt:
    async def test_publish_subscribe_qos1_roundtrip_in_311(self, amqtt_broker):
        """The demo's embedded broker: a 3.1.1 subscriber gets a 3.1.1 QoS 1 publish and
        acks it; the PUBACK and SUBACK come from amqtt."""
        hook = Recorder([(JOBS, 1)])
        async with (
            device311(amqtt_broker, hook) as client,
            MqttClient(v311(amqtt_broker, "cp")) as control,
        ):
            await client.wait_connected()
            await control.wait_connected()
            await control.subscribe([(PRESENCE, 1)])
            await control.publish(JOBS, b"job-1", qos=1)
            await client.publish(PRESENCE, b"online", qos=1, retain=True)
            job = await next_message(client.messages())
            presence = await next_message(control.messages())
            acks = (client.ack(job), control.ack(presence))
        assert (job.topic, job.payload, job.qos) == (JOBS, b"job-1", 1)
        assert (presence.payload, presence.qos) == (b"online", 1)
        assert acks == (True, True)
        assert [c.session_present for c in hook.connections] == [False]
