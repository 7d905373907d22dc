"""Mutual TLS and the broker ACL, against a real Mosquitto running the GENERATED configuration.

``edgelm provision fleet-init`` makes the fleet CA; ``broker-config`` writes mosquitto.conf,
the ACL and the CRL; each test starts ``mosquitto -c`` on that file (only the port is chosen
here, with ``--port``). Devices and the control plane connect with the identities provisioning
issued. Nothing asserts on timing: a message that must not arrive is followed by an allowed
marker on the same connection, and the test checks that the marker came and the other did not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgelm_protocol import ReportedState, Topic, decode
from edgelm_protocol.mqtt import (
    InboundMessage,
    MqttClient,
    MqttSettings,
    PublishRefused,
    SubscribeRefused,
)
from edgelm_protocol.mqtt.settings import client_tls_context
from edgelm_provisioning.broker_config import copy_crl, write_broker_config
from edgelm_provisioning.enrollment import issue_device
from edgelm_provisioning.fleet_ca import FleetCa, issue_device_identity, revoke_device
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet
from tests.agent_process import AgentProcess
from tests.fleet_harness import FLEET, Director, Repository, bundle, enroll
from tests.mosquitto import HOST, Mosquitto, free_port

pytestmark = pytest.mark.timeout(180)

BASE = f"edgelm/v1/{FLEET}"


class GeneratedMosquitto(Mosquitto):
    """tests.mosquitto's process handling, on the config broker-config wrote (unchanged but
    for ``user root`` when the tests run as root: Mosquitto would drop to a user that cannot
    read the 0700 test folders)."""

    def __init__(self, workdir: Path, config: Path, port: int) -> None:
        self._generated = config
        super().__init__(workdir, port=port)

    def _write_config(self, denied_topics: object) -> None:
        self.config_path = self._generated
        if os.geteuid() == 0:
            with self.config_path.open("a") as f:
                f.write("user root\n")

    def reload(self) -> None:
        """SIGHUP: Mosquitto reloads its configuration, certificates and CRL."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)


@dataclass
class Identity:
    name: str
    folder: Path

    @property
    def files(self) -> tuple[str, str, str]:
        return tuple(str(self.folder / n) for n in ("ca.pem", "cert.pem", "key.pem"))  # type: ignore[return-value]

    def context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        ca, cert, key = self.files
        return client_tls_context(ca, cert, key) if with_cert else client_tls_context(ca)


@dataclass
class TlsFleet:
    root: Path
    fleet: FleetDir
    broker: GeneratedMosquitto
    broker_dir: Path
    workdir: Path

    def identity(self, device: str, ca: FleetCa | None = None) -> Identity:
        """A device key and certificate from the fleet CA (or from ``ca``), as files."""
        tls = issue_device_identity(ca or FleetCa.load(self.root), device, now=int(time.time()))
        folder = self.workdir / f"id-{device}-{os.urandom(4).hex()}"
        folder.mkdir()
        (folder / "ca.pem").write_text(FleetCa.load(self.root).ca_pem)
        (folder / "cert.pem").write_text(tls["cert"])
        (folder / "key.pem").write_text(tls["key"])
        return Identity(device, folder)

    def control_identity(self) -> Identity:
        folder = self.root / "control" / "tls"
        link = self.workdir / "id-control"
        link.mkdir(exist_ok=True)
        for src, dst in (
            ("ca.pem", "ca.pem"),
            ("client.pem", "cert.pem"),
            ("client-key.pem", "key.pem"),
        ):
            (link / dst).write_bytes((folder / src).read_bytes())
        return Identity("control", link)


@pytest.fixture
def tls_fleet(short_tmp: Path) -> Iterator[TlsFleet]:
    port = free_port()
    root = short_tmp / "fleet"
    init_fleet(
        root,
        fleet=FLEET,
        control_url="http://127.0.0.1:8480",
        broker_url=f"mqtts://127.0.0.1:{port}",
        now=int(time.time()),
    )
    fleet = FleetDir.open(root)
    broker_dir = short_tmp / "broker"
    write_broker_config(
        fleet, broker_dir, port=port, bind=HOST, install_dir=None, now=int(time.time())
    )
    broker = GeneratedMosquitto(short_tmp / "mosquitto", broker_dir / "mosquitto.conf", port)
    broker.start()
    try:
        yield TlsFleet(root, fleet, broker, broker_dir, short_tmp)
    finally:
        broker.stop(timeout_s=10)
        broker.kill()


def settings(fleet: TlsFleet, identity: Identity, **kwargs: object) -> MqttSettings:
    return MqttSettings(
        host=HOST,
        port=fleet.broker.port,
        client_id=identity.name,
        tls=identity.context(),
        clean_start=True,
        session_expiry_s=0,
        **kwargs,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def connected(fleet: TlsFleet, identity: Identity) -> AsyncIterator[MqttClient]:
    client = MqttClient(settings(fleet, identity))
    await client.start()
    try:
        await asyncio.wait_for(client.wait_connected(), 60)
        yield client
    finally:
        await asyncio.wait_for(client.stop(), 60)


async def next_message(client: MqttClient) -> InboundMessage:
    async for message in client.messages():
        client.ack(message)
        return message
    raise AssertionError("the message stream ended")


async def until_marker(client: MqttClient, marker_topic: str) -> list[str]:
    """Topics of everything received up to and including the marker."""
    seen = []
    while True:
        message = await asyncio.wait_for(next_message(client), 60)
        seen.append(message.topic)
        if message.topic == marker_topic:
            return seen


def try_connect(port: int, context: ssl.SSLContext, client_id: str) -> bool:
    """One MQTT connection attempt with paho: True only if the broker sent CONNACK success.

    The outcome is an event (CONNACK, or the connection closing), never a timer."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.tls_set_context(context)
    done = threading.Event()
    result: list[bool] = []

    def on_connect(c: paho.Client, u: object, flags: object, rc: object, props: object) -> None:
        result.append(not getattr(rc, "is_failure", True))
        done.set()

    def on_gone(*args: object) -> None:
        result.append(False)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_gone
    client.on_connect_fail = on_gone
    try:
        client.connect(HOST, port, keepalive=30)
    except (ssl.SSLError, OSError):
        return False
    client.loop_start()
    try:
        assert done.wait(60), "neither CONNACK nor a closed connection"
        return result[0]
    finally:
        client.disconnect()
        client.loop_stop()


class TestAcl:
    async def test_a_device_cannot_read_another_devices_desired_state(self, tls_fleet):
        """A's subscription to B's desired is refused in the SUBACK (EMQX) or granted and never
        served (Mosquitto's acl_file checks at delivery); A's own desired arrives."""
        a, b = tls_fleet.identity("a"), tls_fleet.identity("b")
        control = tls_fleet.control_identity()
        async with connected(tls_fleet, a) as dev_a, connected(tls_fleet, control) as cp:
            del b
            with contextlib.suppress(SubscribeRefused):
                await dev_a.subscribe([(f"{BASE}/dev/b/desired", 1), (f"{BASE}/dev/b/jobs", 1)])
            with contextlib.suppress(SubscribeRefused):
                await dev_a.subscribe([(f"{BASE}/#", 1)])
            await dev_a.subscribe([(f"{BASE}/dev/a/desired", 1)])
            await cp.publish(f"{BASE}/dev/b/desired", b"b's secret desired state")
            await cp.publish(f"{BASE}/dev/b/jobs", b"b's prompt")
            await cp.publish(f"{BASE}/dev/a/desired", b"marker")
            seen = await until_marker(dev_a, f"{BASE}/dev/a/desired")
        assert not [t for t in seen if "/dev/b/" in t], seen

    async def test_a_device_cannot_publish_as_another_device(self, tls_fleet):
        """A's publishes on B's state and events are refused (PUBACK 0x87) and reach nobody;
        so is a publish on its own desired topic; A's own state reaches the control plane."""
        a = tls_fleet.identity("a")
        control = tls_fleet.control_identity()
        async with connected(tls_fleet, control) as cp, connected(tls_fleet, a) as dev_a:
            await cp.subscribe([(f"{BASE}/dev/+/{c}", 1) for c in ("state", "events", "desired")])
            refused = 0
            for topic in (f"{BASE}/dev/b/state", f"{BASE}/dev/b/events", f"{BASE}/dev/a/desired"):
                try:
                    await dev_a.publish(topic, b"forged")
                except PublishRefused:
                    refused += 1
            await dev_a.publish(f"{BASE}/dev/a/state", b"marker")
            seen = await until_marker(cp, f"{BASE}/dev/a/state")
        assert seen == [f"{BASE}/dev/a/state"]
        assert refused == 3  # Mosquitto answers MQTT 5 clients with "not authorized"

    async def test_the_control_identity_reads_and_writes_every_device(self, tls_fleet):
        """The control plane's certificate (CN control) reaches every device's channels."""
        a = tls_fleet.identity("a")
        control = tls_fleet.control_identity()
        async with connected(tls_fleet, a) as dev_a, connected(tls_fleet, control) as cp:
            await cp.subscribe([(f"{BASE}/dev/+/presence", 1)])
            await dev_a.subscribe([(f"{BASE}/announce", 1), (f"{BASE}/dev/a/jobs", 1)])
            await cp.publish(f"{BASE}/announce", b"announce")
            await cp.publish(f"{BASE}/dev/a/jobs", b"job")
            assert await until_marker(dev_a, f"{BASE}/dev/a/jobs") == [
                f"{BASE}/announce",
                f"{BASE}/dev/a/jobs",
            ]
            await dev_a.publish(f"{BASE}/dev/a/presence", b"online")
            assert (await asyncio.wait_for(next_message(cp), 60)).topic == f"{BASE}/dev/a/presence"


class TestIdentity:
    def test_a_client_without_a_certificate_is_refused(self, tls_fleet):
        a = tls_fleet.identity("a")
        assert try_connect(tls_fleet.broker.port, a.context(), "a")  # the same, with its cert
        assert not try_connect(tls_fleet.broker.port, a.context(with_cert=False), "a")

    def test_a_certificate_from_another_ca_is_refused(self, tls_fleet, short_tmp):
        """A certificate for the same device id, made by another fleet's CA, is refused."""
        other_root = short_tmp / "other"
        init_fleet(
            other_root,
            fleet=FLEET,
            control_url="http://127.0.0.1:8480",
            broker_url="mqtts://127.0.0.1:1",
            now=int(time.time()),
        )
        forged = tls_fleet.identity("a", ca=FleetCa.load(other_root))
        # it trusts the real broker (the fleet CA) but presents the other CA's certificate
        assert not try_connect(tls_fleet.broker.port, forged.context(), "a")

    def test_a_wrong_broker_is_refused_by_the_device(self, tls_fleet, short_tmp):
        """A device trusts the fleet CA only: a broker certificate from another CA fails."""
        other_root = short_tmp / "other"
        init_fleet(
            other_root,
            fleet=FLEET,
            control_url="http://127.0.0.1:8480",
            broker_url="mqtts://127.0.0.1:1",
            now=int(time.time()),
        )
        a = tls_fleet.identity("a")
        context = client_tls_context(str(other_root / "tls" / "ca.pem"), *a.files[1:])
        assert not try_connect(tls_fleet.broker.port, context, "a")

    async def test_a_revoked_device_is_refused_after_sighup_and_others_are_not(self, tls_fleet):
        """revoke writes the CRL; after SIGHUP the broker refuses the device's handshake,
        while another device still connects."""
        a, b = tls_fleet.identity("a"), tls_fleet.identity("b")
        port = tls_fleet.broker.port
        assert try_connect(port, a.context(), "a")
        serials, crl = revoke_device(tls_fleet.root, "a", now=int(time.time()))
        assert serials
        copy_crl(crl, tls_fleet.broker_dir)
        tls_fleet.broker.reload()
        # Mosquitto logs this while it reloads, in its one thread, before any new connection
        await tls_fleet.broker.wait_for_log("Reloading config.")
        assert not try_connect(port, a.context(), "a")
        assert try_connect(port, b.context(), "b")


class TestAgentOverMtls:
    async def test_an_agent_enrolled_with_a_tls_bundle_reports_its_state(self, tls_fleet):
        """edgelm agent enroll installs the bundle's CA and identity; the agent connects over
        mqtts:// with them and its state reaches the control identity."""
        fleet = tls_fleet
        repository = Repository(fleet.workdir)
        repository.serve()
        agent: AgentProcess | None = None
        try:
            bundle_path = fleet.workdir / "kiosk-1.json"
            tls = issue_device_identity(FleetCa.load(fleet.root), "kiosk-1", now=int(time.time()))
            bundle(
                bundle_path,
                "kiosk-1",
                repository,
                Director(),
                fleet.broker.port,
                broker={"url": f"mqtts://127.0.0.1:{fleet.broker.port}"},
                tls=tls,
            )
            state_dir = fleet.workdir / "agent" / "state"
            enrolled = enroll(state_dir, bundle_path)
            assert enrolled.returncode == 0, enrolled.stderr
            key = state_dir / "fleet" / "tls" / "client-key.pem"
            assert key.stat().st_mode & 0o777 == 0o600
            control = fleet.control_identity()
            async with connected(fleet, control) as cp:
                await cp.subscribe([(f"{BASE}/dev/+/state", 1)])
                agent = AgentProcess(fleet.workdir / "agent", model=None).wait_alive()
                message = await asyncio.wait_for(next_message(cp), 120)
                topic = Topic.parse(message.topic)
                assert topic.device == "kiosk-1"
                assert isinstance(decode(topic, message.payload).body, ReportedState)
        finally:
            if agent is not None:
                agent.stop()
            repository.stop()


def test_the_generated_acl_file_is_the_one_running(tls_fleet):
    """The broker runs broker-config's files, not a test's own (guards the fixture)."""
    conf = tls_fleet.broker.config_path.read_text()
    assert conf.startswith("# edgelm fleet acme: written by `edgelm provision broker-config`")
    assert json.dumps(str(tls_fleet.broker_dir / "acl"))[1:-1] in conf


def test_issue_device_refuses_wildcards_for_certificates_too(tls_fleet, short_tmp):
    """+, # and a/b cannot be issued (so no certificate with them can exist)."""
    from edgelm_provisioning.errors import InvalidValue

    for device in ("+", "#", "a/b"):
        with pytest.raises(InvalidValue):
            issue_device(
                tls_fleet.fleet,
                device,
                hardware_class="x86",
                labels=None,
                out=short_tmp / "x.json",
                reissue=False,
                now=int(time.time()),
            )
        with pytest.raises(InvalidValue):
            issue_device_identity(FleetCa.load(tls_fleet.root), device, now=int(time.time()))
