"""Revocation end to end: the broker refuses the device, and the control plane ignores what it
left queued.

Everything is the real thing: a fleet made by ``fleet-init``, Mosquitto running the
configuration ``edgelm provision broker-config`` wrote (mutual TLS, ACL, CRL, persistence; only
the port is chosen here), ``edgelm control run`` as a process with the fleet's own
``control.toml``, devices connecting with certificates from the fleet CA, and the operator's
``edgelm provision revoke`` and ``edgelm fleet devices revoke`` as processes.

The story: the control plane is stopped (its persistent session on the broker keeps what comes
meanwhile); two devices publish events, a job result, telemetry and state at QoS 1; the
operator revokes one of them while the control plane is away (CRL, SIGHUP), and is told the
command that tells the control plane later; the control plane starts with its broker link
still down (a relay that refuses connections), the operator runs that command, the link comes
up, and the queue drains: nothing of the revoked device is stored (the metric and the log say
``device_revoked``), everything of the other one is. A message the revoked device then sends
on the connection it held through the broker's reload is refused too, and it cannot connect
again.

Nothing asserts on timing: each step waits for the state it needs (bounded by a deadline), and
a message that must not be stored is looked for after a later message that was.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgelm_protocol import (
    Event,
    EventKind,
    JobOutcome,
    JobResult,
    ModelRef,
    Percentiles,
    Presence,
    PresenceStatus,
    ReportedState,
    Telemetry,
    Topic,
    encode,
    new_envelope,
)
from edgelm_protocol.mqtt import MqttClient, MqttSettings
from edgelm_protocol.mqtt.settings import client_tls_context
from edgelm_provisioning.broker_config import write_broker_config
from edgelm_provisioning.fleet_ca import FleetCa, issue_device_identity
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet
from tests.integration.control.control_process import ControlProcess
from tests.mosquitto import HOST, Mosquitto, TcpProxy, free_port

pytestmark = pytest.mark.timeout(300)

FLEET = "acme"
DEADLINE_S = 90.0  # a safety net for a slow machine, never a measurement


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


class GatedRelay(TcpProxy):
    """The control plane's road to the broker: relays while open; while closed, every new
    connection is dropped at once (a broker link that is down)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.open = True

    async def _relay_to_broker(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        if not self.open:
            client_out.transport.abort()
            return
        await super()._relay_to_broker(client_in, client_out)


@dataclass
class Device:
    name: str
    context: ssl.SSLContext
    client: MqttClient | None = None
    seq: int = 0

    async def connect(self, port: int) -> Device:
        settings = MqttSettings(
            host=HOST,
            port=port,
            client_id=self.name,
            tls=self.context,
            clean_start=True,
            session_expiry_s=0,
        )
        self.client = MqttClient(settings)
        await self.client.start()
        await asyncio.wait_for(self.client.wait_connected(), DEADLINE_S)
        return self

    async def close(self) -> None:
        if self.client is not None:
            await asyncio.wait_for(self.client.stop(), DEADLINE_S)
            self.client = None

    async def send(self, body: Any, *, retain: bool = False) -> None:
        """Publish at QoS 1; returns once the broker has it (PUBACK)."""
        assert self.client is not None
        envelope = new_envelope(body, sender=self.name, ts_ms=int(time.time() * 1000))
        topic = Topic.for_type(FLEET, self.name, body.TYPE)
        await self.client.publish(topic.value, encode(envelope), retain=retain)

    async def event(self, kind: EventKind) -> None:
        self.seq += 1
        await self.send(Event(seq=self.seq, kind=kind, model="smollm2@1.0"))


def telemetry() -> Telemetry:
    return Telemetry(
        window_s=10.0,
        model=None,
        requests=3,
        errors=0,
        tokens_per_s=Percentiles(40.0, 50.0),
        ttft_ms=Percentiles(90.0, 120.0),
        queue_depth=0,
        cpu_percent=10.0,
        memory_bytes=None,
        memory_total_bytes=None,
        disk_free_bytes=None,
        temperature_c=None,
    )


def state() -> ReportedState:
    return ReportedState(
        active=ModelRef("smollm2", "1.0", "a" * 64),
        previous=None,
        installed=(),
        hardware_class="pi5",
        labels={"site": "berlin"},
        ram_bytes=4 << 30,
        accelerator="none",
        disk_free_bytes=10 << 30,
        desired_sequence=0,
    )


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


@dataclass
class Cli:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.returncode == 0, (self.stdout, self.stderr)
        return json.loads(self.stdout)


async def edgelm(*args: str | Path) -> Cli:
    """The ``edgelm`` command as a process, without the test's EDGELM_ environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgelm_cli",
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), DEADLINE_S)
    assert process.returncode is not None
    return Cli(process.returncode, out.decode(), err.decode())


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(DEADLINE_S):
        while not await condition():
            await asyncio.sleep(0.05)


@dataclass
class Site:
    """The fleet directory, the broker, the relay in front of it, and the control plane."""

    root: Path
    broker_dir: Path
    broker: GeneratedMosquitto
    relay: GatedRelay
    workdir: Path
    http: aiohttp.ClientSession
    control_url: str
    token: str
    control: ControlProcess | None = None
    starts: int = 0

    def identity(self, device: str) -> ssl.SSLContext:
        """A certificate from the fleet CA for ``device``, as a client TLS context."""
        ca = FleetCa.load(self.root)
        tls = issue_device_identity(ca, device, now=int(time.time()))
        folder = self.workdir / f"id-{device}"
        folder.mkdir()
        for name in ("ca", "cert", "key"):
            (folder / f"{name}.pem").write_text(tls[name])
        return client_tls_context(*(str(folder / f"{n}.pem") for n in ("ca", "cert", "key")))

    async def start_control(self) -> ControlProcess:
        """``edgelm control run`` with the fleet's control.toml; the broker through the relay."""
        self.starts += 1
        env = {
            "EDGELM_CONTROL_BROKER_URL": f"mqtts://127.0.0.1:{self.relay.port}",
            "EDGELM_CONTROL_LOG_FORMAT": "json",
            "EDGELM_CONTROL_INGEST_DECODE_WORKERS": "0",
            "EDGELM_CONTROL_INGEST_FLUSH_INTERVAL_S": "0.01",
            "EDGELM_CONTROL_ENGINE_TICK_S": "0.2",
        }
        log = self.workdir / f"control-{self.starts}.log"
        self.control = ControlProcess(self.root / "control" / "control.toml", log, env)
        await asyncio.to_thread(self.control.wait_ready, DEADLINE_S)
        assert self.control.url == self.control_url
        return self.control

    async def stop_control(self) -> None:
        if self.control is not None:
            assert await asyncio.to_thread(self.control.terminate, DEADLINE_S) == 0
            self.control = None

    async def get(self, path: str) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.http.get(self.control_url + path, headers=headers) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def refused(self, code: str) -> float:
        status, text = await self.get("/metrics")
        assert status == 200
        prefix = f'edgelm_control_messages_refused_total{{code="{code}"}}'
        found = [line.split()[-1] for line in text.splitlines() if line.startswith(prefix)]
        return float(found[0]) if found else 0.0


@pytest.fixture
async def site(short_tmp: Path) -> AsyncIterator[Site]:
    broker_port, http_port = free_port(), free_port()
    root = short_tmp / "fleet"
    control_url = f"http://127.0.0.1:{http_port}"
    init_fleet(
        root,
        fleet=FLEET,
        control_url=control_url,
        broker_url=f"mqtts://127.0.0.1:{broker_port}",
        now=int(time.time()),
    )
    broker_dir = short_tmp / "broker"
    write_broker_config(
        FleetDir.open(root),
        broker_dir,
        port=broker_port,
        bind=HOST,
        install_dir=None,
        now=int(time.time()),
    )
    broker = GeneratedMosquitto(short_tmp / "mosquitto", broker_dir / "mosquitto.conf", broker_port)
    broker.start()
    http = aiohttp.ClientSession()
    try:
        async with GatedRelay(broker_port) as relay:
            token = (root / "operator-token").read_text().strip()
            found = Site(root, broker_dir, broker, relay, short_tmp, http, control_url, token)
            try:
                yield found
            finally:
                if found.control is not None:
                    await asyncio.to_thread(found.control.kill)
    finally:
        await http.close()
        broker.stop(timeout_s=10)
        broker.kill()


class TestRevocationEndToEnd:
    async def test_what_a_revoked_device_left_queued_is_refused_and_it_cannot_reconnect(
        self, site: Site
    ):
        """The whole story of the module's docstring, on the generated broker config."""
        thief, honest = (
            Device("kiosk-7", site.identity("kiosk-7")),
            Device("kiosk-8", site.identity("kiosk-8")),
        )
        broker_port = site.broker.port
        try:
            # The control plane has met both devices, and a job is out to both.
            await site.start_control()
            for device in (thief, honest):
                await device.connect(broker_port)
                await device.send(Presence(PresenceStatus.ONLINE, "1.0"), retain=True)

            async def both_known() -> bool:
                codes = [
                    (await site.get(f"/api/v1/devices/{d}"))[0] for d in ("kiosk-7", "kiosk-8")
                ]
                return codes == [200, 200]

            await until(both_known)
            job = await post(site, "/api/v1/jobs", {
                "request": {"prompt": "count the pallets", "max_tokens": 8},
                "selector": {"devices": ["kiosk-7", "kiosk-8"]},
            })  # fmt: skip
            _, before = await site.get("/api/v1/devices/kiosk-7")
            job_ids = {d["device"]: d["message_id"] for d in job["devices"]}

            # Stopped: what the devices send now waits in its session on the broker.
            await site.stop_control()
            for device in (thief, honest):
                await device.send(telemetry())
                await device.send(state(), retain=True)
                await device.event(EventKind.INSTALLED)
                await device.send(
                    JobResult(
                        job_id=job_ids[device.name],
                        state=JobOutcome.SUCCEEDED,
                        result={"choices": [{"text": "42"}]},
                    )
                )

            # The operator revokes kiosk-7 while the control plane is away.
            first = await edgelm(
                "provision", "revoke", "kiosk-7",
                "--fleet-dir", site.root, "--broker-dir", site.broker_dir,
                "--reason", "stolen from the loading dock", "--json",
            )  # fmt: skip
            revoked = first.json()
            assert revoked["revoked_serials"]
            told = revoked["control_plane"]
            assert told["revoked"] is False
            assert told["error"]["reference"] == "control-unreachable"
            assert shlex.split(told["command"]) == [
                "edgelm", "fleet", "devices", "revoke", "kiosk-7",
                "--fleet-dir", str(site.root), "--reason", "stolen from the loading dock",
            ]  # fmt: skip
            site.broker.reload()
            await site.broker.wait_for_log("Reloading config.")

            # The control plane starts with its broker link down; the operator tells it.
            site.relay.open = False
            await site.start_control()
            printed = await edgelm(*shlex.split(told["command"])[1:])
            assert printed.returncode == 0, printed.stderr
            assert "revoked kiosk-7 in the control plane" in printed.stderr
            assert printed.stdout == ""

            # The link comes up: the queue drains.
            site.relay.open = True

            async def drained() -> bool:
                return await events_of(site, "kiosk-8") == ["installed"] and (
                    await site.refused("device_revoked") >= 4
                )

            await until(drained)

            # kiosk-7 still holds the connection it had before the reload: the broker keeps
            # it, but what comes through it is refused like the rest. kiosk-8's goes last.
            await thief.event(EventKind.ACTIVATED)
            await honest.event(EventKind.ACTIVATED)

            async def live_refused() -> bool:
                return await events_of(site, "kiosk-8") == ["activated", "installed"] and (
                    await site.refused("device_revoked") >= 5
                )

            await until(live_refused)

            # Nothing of kiosk-7 was stored or acted upon; all of kiosk-8 was.
            refused = await site.refused("device_revoked")
            _, after = await site.get("/api/v1/devices/kiosk-7")
            assert after["last_seen"] == before["last_seen"]
            assert after["hardware_class"] is None
            assert after["recent_events"] == after["recent_telemetry"] == []
            assert after["revocation"]["reason"] == "stolen from the loading dock"
            _, honest_now = await site.get("/api/v1/devices/kiosk-8")
            assert honest_now["hardware_class"] == "pi5"
            assert len(honest_now["recent_telemetry"]) == 1
            _, job_now = await site.get(f"/api/v1/jobs/{job['id']}")
            assert {d["device"]: d["state"] for d in job_now["devices"]} == {
                "kiosk-7": "cancelled",
                "kiosk-8": "succeeded",
            }
            assert site.control is not None
            lines = [json.loads(ln) for ln in site.control.log().splitlines() if ln.startswith("{")]
            refusals = [
                line
                for line in lines
                if line.get("event") == "fleet_message_refused"
                and line.get("code") == "device_revoked"
            ]
            assert {line["device"] for line in refusals} == {"kiosk-7"}
            assert len(refusals) == refused >= 5

            # The broker refuses kiosk-7's handshake now; kiosk-8 still connects.
            for device in (thief, honest):
                await device.close()
            assert not await asyncio.to_thread(try_connect, broker_port, thief.context, "kiosk-7")
            assert await asyncio.to_thread(try_connect, broker_port, honest.context, "kiosk-8")

            # Run again with the control plane up, revoke tells it, which had it already.
            again = (
                await edgelm("provision", "revoke", "kiosk-7", "--fleet-dir", site.root, "--json")
            ).json()
            assert again["revoked_serials"] == []
            assert again["control_plane"]["revoked"] is True
            assert again["control_plane"]["answer"]["created"] is False
            # And a device revoked while the control plane is up is revoked in both at once.
            site.identity("kiosk-9")
            third = (
                await edgelm("provision", "revoke", "kiosk-9", "--fleet-dir", site.root, "--json")
            ).json()
            assert third["revoked_serials"]
            assert third["control_plane"]["revoked"] is True
            assert third["control_plane"]["answer"]["created"] is True
        finally:
            for device in (thief, honest):
                await device.close()
            await site.stop_control()


async def events_of(site: Site, device: str) -> list[str]:
    """The kinds of the device's stored events, sorted."""
    _, found = await site.get(f"/api/v1/devices/{device}")
    return sorted(e["kind"] for e in found["recent_events"])


async def post(site: Site, path: str, body: dict[str, Any]) -> Any:
    headers = {"Authorization": f"Bearer {site.token}"}
    async with site.http.post(site.control_url + path, json=body, headers=headers) as response:
        answer = await response.json()
        assert response.status in (200, 201), answer
        return answer
