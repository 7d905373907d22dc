"""Mutual TLS and the broker ACL, against a real Mosquitto running the GENERATED configuration.

``edgelm provision fleet-init`` makes the fleet CA; ``broker-config`` writes mosquitto.conf,
the ACL and the CRL; each test starts ``mosquitto -c`` on that file (only the port is chosen
here, with ``--port``). Devices and the control plane connect with the identities provisioning
issued. Nothing asserts on timing: a message that must not arrive is followed by an allowed
marker on the same connection, and the test checks that the marker came and the other did not.

Also here, each against the same real broker: a device whose key was made on the device
(``enroll --csr``), a CA rotation through its overlap period, and one identity per
control-plane replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgelm_protocol import ReportedState, Topic, decode
from edgelm_protocol.mqtt import (
    ConnectionInfo,
    InboundMessage,
    MqttClient,
    MqttSettings,
    PublishRefused,
    SubscribeRefused,
)
from edgelm_protocol.mqtt.settings import client_tls_context
from edgelm_provisioning.broker_config import copy_crl, write_broker_config
from edgelm_provisioning.ca_rotation import finish_rotation, start_rotation
from edgelm_provisioning.control_identity import issue_control_identity
from edgelm_provisioning.enrollment import issue_device
from edgelm_provisioning.fleet_ca import (
    CaPaths,
    FleetCa,
    issue_device_identity,
    revoke_device,
    write_server_identity,
)
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet
from tests.agent_process import REPO, AgentProcess
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

    def control_identity(self, replica: str | None = None) -> Identity:
        """``control``, or replica ``replica``'s own identity (``control:NAME``)."""
        folder = self.root / "control" / "tls"
        source = folder if replica is None else folder / "replicas" / replica
        name = "control" if replica is None else f"control:{replica}"
        link = self.workdir / f"id-{name.replace(':', '-')}"
        link.mkdir(exist_ok=True)
        (link / "ca.pem").write_bytes((folder / "ca.pem").read_bytes())
        (link / "cert.pem").write_bytes((source / "client.pem").read_bytes())
        (link / "key.pem").write_bytes((source / "client-key.pem").read_bytes())
        return Identity(name, link)

    def regenerate_broker(self) -> None:
        """broker-config --force (as an operator does after a CA or identity change), then
        restart the broker on the same port."""
        write_broker_config(
            self.fleet,
            self.broker_dir,
            port=self.broker.port,
            bind=HOST,
            install_dir=None,
            now=int(time.time()),
            force=True,
            run_as_root=os.geteuid() == 0,
        )
        self.broker.restart(timeout_s=30)


@pytest.fixture
def tls_fleet(short_tmp: Path) -> Iterator[TlsFleet]:
    port = free_port()
    root = short_tmp / "fleet"
    init_fleet(
        root,
        fleet=FLEET,
        control_url=f"https://127.0.0.1:{free_port()}",  # nothing listens: no repository
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


def edgelm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The ``edgelm`` CLI as a subprocess, as an operator or a device would run it."""
    return subprocess.run(
        [sys.executable, "-m", "edgelm_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


def enroll_from_own_request(fleet: TlsFleet, workdir: Path) -> None:
    """The whole --csr round trip through the CLI, with the checks on each step."""
    state = workdir / "state"
    request = fleet.workdir / "kiosk-2.csr"
    made = edgelm(
        *("agent", "enroll", "--csr", "--device-id", "kiosk-2", "--state-dir", state),
        *("--out", request, "--json"),
    )
    assert made.returncode == 0, made.stderr
    key_path = Path(json.loads(made.stdout)["key"])
    assert key_path.stat().st_mode & 0o777 == 0o600
    private = "".join(key_path.read_text().splitlines()[1:-1])

    # A request made in another state directory, signed: this device must refuse it.
    stray = fleet.workdir / "stray.csr"
    other = edgelm(
        *("agent", "enroll", "--csr", "--device-id", "kiosk-2"),
        *("--state-dir", fleet.workdir / "elsewhere", "--out", stray),
    )
    assert other.returncode == 0, other.stderr
    wrong = fleet.workdir / "wrong.json"
    signed = edgelm(
        *("provision", "device", "kiosk-2", "--fleet-dir", fleet.root, "--class", "x86"),
        *("--csr", stray, "--out", wrong, "--json"),
    )
    assert signed.returncode == 0, signed.stderr
    refused = edgelm("agent", "enroll", wrong, "--state-dir", state, "--json")
    assert refused.returncode != 0
    assert "not for the key pending on this device" in refused.stdout + refused.stderr

    right = fleet.workdir / "kiosk-2.json"
    signed = edgelm(
        *("provision", "device", "kiosk-2", "--fleet-dir", fleet.root, "--reissue"),
        *("--csr", request, "--out", right, "--json"),
    )
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout)["key_in_bundle"] is False
    raw = right.read_text()
    assert private not in raw.replace("\\n", "")
    assert "key" not in json.loads(raw)["tls"]
    enrolled = edgelm("agent", "enroll", right, "--state-dir", state, "--json")
    assert enrolled.returncode == 0, enrolled.stderr
    assert json.loads(enrolled.stdout)["key_made_on_device"] is True
    installed = state / "fleet" / "tls" / "client-key.pem"
    assert "".join(installed.read_text().splitlines()[1:-1]) == private
    assert not key_path.exists()  # the pending copy is gone; the key lives in tls/


class TestKeyMadeOnTheDevice:
    async def test_an_agent_enrolled_from_its_own_request_connects_over_mtls(self, tls_fleet):
        """enroll --csr makes the key in the state dir; provision device --csr signs the
        request into a bundle without a key; enroll pairs them (refusing a certificate for
        another key); the agent connects over mutual TLS with the key that never moved."""
        fleet = tls_fleet
        workdir = fleet.workdir / "agent"
        enroll_from_own_request(fleet, workdir)
        agent: AgentProcess | None = None
        async with connected(fleet, fleet.control_identity()) as cp:
            await cp.subscribe([(f"{BASE}/dev/+/state", 1)])
            try:
                agent = AgentProcess(workdir, model=None).wait_alive()
                message = await asyncio.wait_for(next_message(cp), 120)
            finally:
                if agent is not None:
                    agent.stop()
        assert Topic.parse(message.topic).device == "kiosk-2"


def context_for(identity: Identity, ca_file: Path) -> ssl.SSLContext:
    """``identity``'s certificate and key, trusting the CAs in ``ca_file`` only."""
    _, cert, key = identity.files
    return client_tls_context(str(ca_file), cert, key)


class TestCaRotation:
    def test_both_cas_work_during_the_overlap_and_the_old_one_stops_after(self, tls_fleet):
        """Overlap: a device with an old-CA certificate and one with a new-CA certificate
        both connect, each trusting only its own CA (the broker's chain carries the
        cross-certificate), and each accepts the broker trusting either CA. After --finish
        the broker refuses the old-CA certificate; the new one still connects."""
        fleet = tls_fleet
        port = fleet.broker.port
        old = fleet.identity("a")  # issued before the rotation; trusts the old CA only
        old_ca = fleet.workdir / "old-ca.pem"
        old_ca.write_bytes((fleet.root / "tls" / "ca.pem").read_bytes())
        assert try_connect(port, old.context(), "a")

        start_rotation(fleet.root, fleet.fleet.config, now=int(time.time()))
        fleet.regenerate_broker()
        new = fleet.identity("b")  # from the new CA; trusts the new CA only
        new_ca = fleet.workdir / "new-ca.pem"
        new_ca.write_bytes((fleet.root / "tls" / "ca.pem").read_bytes())
        assert old_ca.read_bytes() != new_ca.read_bytes()
        for identity in (old, new):
            for ca_file in (old_ca, new_ca):
                assert try_connect(port, context_for(identity, ca_file), identity.name), (
                    identity.name,
                    ca_file.name,
                )

        finish_rotation(fleet.root, now=int(time.time()), force=True)
        fleet.regenerate_broker()
        assert not try_connect(port, context_for(old, new_ca), "a")
        assert try_connect(port, context_for(new, new_ca), "b")

    def test_a_device_revoked_during_the_overlap_is_refused_whichever_ca_issued_it(self, tls_fleet):
        """Both CRLs are in force during the overlap: an old-CA and a new-CA device revoked
        are refused, another old-CA device still connects."""
        fleet = tls_fleet
        port = fleet.broker.port
        a, c = fleet.identity("a"), fleet.identity("c")
        start_rotation(fleet.root, fleet.fleet.config, now=int(time.time()))
        b = fleet.identity("b")
        revoke_device(fleet.root, "a", now=int(time.time()))
        revoke_device(fleet.root, "b", now=int(time.time()))
        fleet.regenerate_broker()
        assert not try_connect(port, a.context(), "a")
        assert not try_connect(port, b.context(), "b")
        assert try_connect(port, c.context(), "c")

    def test_a_re_enrolled_device_drops_the_old_ca_so_its_key_cannot_pose_as_the_broker(
        self, tls_fleet
    ):
        """A device enrolled before the rotation enrolls its reissued bundle during the
        overlap: its ca.pem is the new CA alone and it connects. A broker whose certificate
        the old CA's key signed (a leaked key, the reason to rotate) is refused by it and by
        the control plane, though a client still trusting the old CA accepts that broker.
        After --finish the device still connects."""
        fleet = tls_fleet
        port = fleet.broker.port
        state = fleet.workdir / "kiosk-1" / "state"
        path = fleet.workdir / "kiosk-1.json"
        issue_device(
            fleet.fleet,
            "kiosk-1",
            hardware_class="x86",
            labels=None,
            out=path,
            reissue=False,
            now=int(time.time()),
        )
        enrolled = enroll(state, path)
        assert enrolled.returncode == 0, enrolled.stderr
        old_ca = fleet.workdir / "old-ca.pem"
        old_ca.write_bytes((fleet.root / "tls" / "ca.pem").read_bytes())
        old = fleet.identity("a")  # never reissued: trusts the old CA only
        installed = [
            state / "fleet" / "tls" / n for n in ("ca.pem", "client.pem", "client-key.pem")
        ]
        assert installed[0].read_bytes() == old_ca.read_bytes()

        start_rotation(fleet.root, fleet.fleet.config, now=int(time.time()))
        fleet.regenerate_broker()
        issue_device(
            fleet.fleet,
            "kiosk-1",
            hardware_class=None,
            labels=None,
            out=path,
            reissue=True,
            now=int(time.time()),
        )
        enrolled = enroll(state, path)
        assert enrolled.returncode == 0, enrolled.stderr
        ca = FleetCa.load(fleet.root)
        assert installed[0].read_text() == ca.ca_pem  # the new CA, alone
        device = client_tls_context(*map(str, installed))
        assert try_connect(port, device, "kiosk-1")
        control = fleet.control_identity()
        assert try_connect(port, control.context(), "control")

        # The old CA's key signs a broker certificate: a rogue broker on another port, with
        # the generated configuration otherwise (it accepts either CA's client certificates).
        assert ca.previous is not None
        assert ca.previous_key is not None
        leaked = FleetCa(CaPaths(fleet.workdir / "leaked"), ca.previous_key, ca.previous)
        leaked.paths.tls_dir.mkdir(parents=True)
        rogue_dir, rogue_port = fleet.workdir / "rogue", free_port()
        write_broker_config(
            fleet.fleet,
            rogue_dir,
            port=rogue_port,
            bind=HOST,
            install_dir=None,
            now=int(time.time()),
        )
        write_server_identity(
            leaked,
            ["127.0.0.1", "localhost"],
            rogue_dir / "server.pem",
            rogue_dir / "server-key.pem",
            now=int(time.time()),
        )
        rogue = GeneratedMosquitto(
            fleet.workdir / "rogue-run", rogue_dir / "mosquitto.conf", rogue_port
        )
        rogue.start()
        try:
            assert try_connect(rogue_port, context_for(old, old_ca), "a")  # it is a broker
            assert not try_connect(rogue_port, device, "kiosk-1")
            assert not try_connect(rogue_port, control.context(), "control")
        finally:
            rogue.stop(timeout_s=10)
            rogue.kill()

        finish_rotation(fleet.root, now=int(time.time()), force=True)  # "a" is locked out
        fleet.regenerate_broker()
        assert try_connect(port, device, "kiosk-1")
        assert not try_connect(port, context_for(old, old_ca), "a")


class ConnectCounter:
    """How many times a client's connection was accepted (its ``on_connect`` hook)."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Event()

    async def __call__(self, info: ConnectionInfo) -> None:
        self.count += 1
        self.changed.set()

    async def reaches(self, count: int) -> None:
        while self.count < count:
            self.changed.clear()
            await self.changed.wait()


@contextlib.asynccontextmanager
async def counted(
    fleet: TlsFleet, identity: Identity, **kwargs: Any
) -> AsyncIterator[tuple[MqttClient, ConnectCounter]]:
    counter = ConnectCounter()
    client = MqttClient(settings(fleet, identity, **kwargs), on_connect=counter)
    await client.start()
    try:
        await asyncio.wait_for(client.wait_connected(), 60)
        yield client, counter
    finally:
        await asyncio.wait_for(client.stop(), 60)


async def first_of(*clients: MqttClient) -> InboundMessage:
    """The next message that reaches any of ``clients`` (a shared subscription picks one)."""
    tasks = [asyncio.create_task(next_message(c)) for c in clients]
    try:
        done, _ = await asyncio.wait(tasks, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no client got the message"
        return done.pop().result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TestReplicaIdentities:
    async def test_two_replicas_stay_connected_and_both_read_device_channels(self, tls_fleet):
        """control:eu-1 and control:eu-2 connect at once, each reads a device's state, both
        share the events through $share/..., and neither was ever disconnected."""
        fleet = tls_fleet
        for name in ("eu-1", "eu-2"):
            issue_control_identity(fleet.root, name, now=int(time.time()))
        fleet.regenerate_broker()
        one, two = fleet.control_identity("eu-1"), fleet.control_identity("eu-2")
        device = fleet.identity("a")
        async with (
            counted(fleet, one) as (r1, n1),
            counted(fleet, two) as (r2, n2),
            connected(fleet, device) as dev,
        ):
            await r1.subscribe([(f"{BASE}/dev/+/state", 1)])
            await r2.subscribe([(f"{BASE}/dev/+/state", 1)])
            await dev.publish(f"{BASE}/dev/a/state", b"state")
            for replica in (r1, r2):
                message = await asyncio.wait_for(next_message(replica), 60)
                assert message.topic == f"{BASE}/dev/a/state"
            shared = f"$share/cp/{BASE}/dev/+/events"
            await r1.subscribe([(shared, 1)])
            await r2.subscribe([(shared, 1)])
            await dev.publish(f"{BASE}/dev/a/events", b"event")
            assert (await first_of(r1, r2)).topic == f"{BASE}/dev/a/events"
            assert (n1.count, n2.count) == (1, 1)
            assert r1.connected
            assert r2.connected

    async def test_two_replicas_sharing_control_knock_each_other_off(self, tls_fleet):
        """Why each replica needs its own: with one identity (one client id under
        use_username_as_clientid) the second connection closes the first."""
        fleet = tls_fleet
        shared = fleet.control_identity()
        async with counted(fleet, shared) as (_, first), counted(fleet, shared) as (_, second):
            del second
            await asyncio.wait_for(first.reaches(2), 60)  # it was disconnected, and came back

    async def test_a_device_cannot_pass_for_a_replica(self, tls_fleet):
        """A device that asks for a replica's client id and user name is still its own CN to
        the broker: the replica stays connected, and the device reads only its own topics."""
        fleet = tls_fleet
        issue_control_identity(fleet.root, "eu-1", now=int(time.time()))
        fleet.regenerate_broker()
        replica = fleet.control_identity("eu-1")
        impostor = fleet.identity("a")
        async with counted(fleet, replica) as (cp, count):
            client = MqttClient(
                MqttSettings(
                    host=HOST,
                    port=fleet.broker.port,
                    client_id="control:eu-1",
                    username="control:eu-1",
                    tls=impostor.context(),
                    clean_start=True,
                    session_expiry_s=0,
                )
            )
            await client.start()
            try:
                await asyncio.wait_for(client.wait_connected(), 60)
                await client.subscribe([(f"{BASE}/dev/+/state", 1), (f"{BASE}/dev/a/desired", 1)])
                await cp.publish(f"{BASE}/dev/b/state", b"b's state")
                await cp.publish(f"{BASE}/dev/a/desired", b"marker")
                seen = await until_marker(client, f"{BASE}/dev/a/desired")
            finally:
                await asyncio.wait_for(client.stop(), 60)
            await cp.subscribe([(f"{BASE}/dev/+/presence", 1)])  # a round trip after it all
            assert count.count == 1
        assert seen == [f"{BASE}/dev/a/desired"]
