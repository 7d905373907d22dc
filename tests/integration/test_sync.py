"""The agent's fleet sync against a real Mosquitto, a repository over real HTTP, and the
control plane's end of the wire played by the protocol package: enrollment, desired states
(and every attack on them), remote jobs, end-to-end acknowledgements, telemetry, faults."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgelm_protocol import (
    Event,
    EventKind,
    JobResult,
    RemoteJob,
    ReportedState,
    TargetRef,
    encode,
    new_envelope,
)
from edgelm_protocol.topics import Channel
from tests.agent_process import TINY_GGUF, AgentProcess
from tests.fleet_harness import (
    Counterpart,
    Director,
    Model,
    Repository,
    bundle,
    counterpart,
    enroll,
    enrolled_agent,
)
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.timeout(300)


@dataclass
class Fleet:
    repository: Repository
    director: Director
    broker: Mosquitto
    workdir: Path
    agents: list[AgentProcess]

    def agent(self, device: str = "kiosk-1", **kwargs: Any) -> AgentProcess:
        agent = enrolled_agent(
            self.workdir / device,
            device,
            self.repository,
            self.director,
            self.broker.port,
            **kwargs,
        )
        self.agents.append(agent)
        return agent


@pytest.fixture
def fleet(short_tmp: Path, mosquitto: Mosquitto) -> Iterator[Fleet]:
    repository = Repository(short_tmp)
    repository.serve()
    fleet = Fleet(repository, Director(), mosquitto, short_tmp, [])
    try:
        yield fleet
    finally:
        for agent in fleet.agents:
            agent.stop()
        repository.stop()


@pytest.fixture
async def control(fleet: Fleet) -> AsyncIterator[Counterpart]:
    async with counterpart(fleet.broker.port) as side:
        yield side


def kinds(side: Counterpart, device: str) -> list[str]:
    return [e.kind.value for e in side.events(device)]


def last_state(side: Counterpart, device: str) -> ReportedState | None:
    states = side.of(device, "state")
    body = states[-1].body if states else None
    return body if isinstance(body, ReportedState) else None


async def served(agent: AgentProcess) -> str | None:
    status, body = agent.request("GET", "/v1/models")
    assert status == 200
    return body["data"][0]["id"] if body["data"] else None


async def activated(side: Counterpart, device: str, model: Model, sequence: int) -> Event:
    def find() -> Event | None:
        for event in side.events(device):
            if event.kind == EventKind.ACTIVATED and event.desired_sequence == sequence:
                return event
        return None

    event: Event = await side.wait_for(find, f"{model.ref} activated")
    return event


class TestEnrollment:
    def test_enrolling_keeps_only_models_the_fleet_lists(self, fleet: Fleet, short_tmp: Path):
        """A standalone device's models are kept only if the fleet's signed metadata lists
        them with the same hash; the trust root is replaced."""
        (short_tmp / "d").mkdir()
        local = AgentProcess(short_tmp / "d", model=TINY_GGUF).wait_ready()
        assert local.stop() == 0
        listed = fleet.repository.add("tiny-llama", "fleet")  # same bytes, fleet version
        path = bundle(short_tmp / "b.json", "kiosk-9", fleet.repository, fleet.director, 1)
        result = enroll(short_tmp / "d" / "state", path)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["device_id"] == "kiosk-9"
        assert report["repository_reachable"] is True
        assert report["models_kept"] == []  # the local version is not the fleet's target
        assert len(report["models_dropped"]) == 1
        anchor = json.loads((short_tmp / "d/state/registry/trust/root.json").read_text())
        assert anchor == fleet.repository.root_json()
        assert "trust_root_replaced" in result.stderr
        assert listed.sha256  # the bytes are in the store already: a rollout fetches nothing

    def test_a_tampered_bundle_is_refused_and_nothing_changes(self, fleet: Fleet, short_tmp):
        """A bundle whose root is not self-signed, or whose device id is hostile, is refused."""
        state = short_tmp / "state"
        cases: list[tuple[str, Any]] = [
            ("device_id", "a/b"),
            ("device_id", "#"),
            ("director_keys", ["x"]),
            # broker URLs the sync service could never use: refused now, not at connection
            ("broker", {"url": "https://broker.lan"}),
            ("broker", {"url": "mqtt://broker.lan:0"}),
            ("broker", {"url": "mqtt://broker.lan?protocol=4"}),
        ]
        for field, value in cases:
            path = bundle(short_tmp / "b.json", "kiosk-1", fleet.repository, fleet.director, 1)
            data = json.loads(path.read_text())
            data[field] = value
            path.write_text(json.dumps(data))
            result = enroll(state, path)
            assert result.returncode == 1, (field, value)
        root = fleet.repository.root_json()
        root["signed"]["version"] = 99  # signature no longer matches
        path = bundle(short_tmp / "b.json", "kiosk-1", fleet.repository, fleet.director, 1)
        data = json.loads(path.read_text())
        data["root"] = root
        path.write_text(json.dumps(data))
        assert enroll(state, path).returncode == 1
        assert not (state / "fleet").exists()

    async def test_a_new_device_reports_its_class_and_labels_as_soon_as_it_connects(
        self, fleet: Fleet, control: Counterpart
    ):
        """Rollouts select on the class and labels in the retained state, so the state must be
        there from the first connection, before the device has done anything else."""
        fleet.agent()
        state = await control.wait_for(
            lambda: last_state(control, "kiosk-1"), "the first reported state"
        )
        assert state.hardware_class == "x86"
        assert dict(state.labels) == {"site": "test"}
        assert state.active is None


class TestDesiredState:
    async def test_a_desired_state_installs_activates_and_reports_each_step(
        self, fleet: Fleet, control: Counterpart
    ):
        """Signed desired state → download → install → activate with a health check; each
        step is an event, the reported state follows, and the model serves."""
        model = fleet.repository.add("tiny", "1.0")
        agent = fleet.agent()
        await control.wait_for(lambda: control.of("kiosk-1", "presence"), "presence")
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", model.target()))
        event = await activated(control, "kiosk-1", model, 1)
        assert event.model == model.ref
        assert event.rollout == "ro-test"
        assert event.health is not None
        assert event.health.tokens_per_s is not None
        assert kinds(control, "kiosk-1")[:4] == [
            "desired_accepted",
            "download_started",
            "installed",
            "activated",
        ]
        assert await served(agent) == "tiny"
        state = await control.wait_for(
            lambda: (s := last_state(control, "kiosk-1")) and s.desired_sequence == 1 and s,
            "the reported state",
        )
        assert state.active is not None
        assert state.active.key == model.ref
        assert state.hardware_class == "x86"
        _, sync = agent.request("GET", "/v1/sync")
        assert sync["broker"]["connected"] is True
        assert sync["desired"]["applied_sequence"] == 1

    @pytest.mark.parametrize(
        "attack",
        [
            "forged",
            "replayed",
            "other-device",
            "expired",
            "not-in-tuf",
            "wrong-hash",
        ],
    )
    async def test_attacks_are_refused_and_the_active_model_serves_on(
        self, fleet: Fleet, control: Counterpart, attack: str
    ):
        """Whoever owns the broker cannot make the device run a model: each attack is
        refused (and reported), and the model that was active keeps serving."""
        good = fleet.repository.add("tiny", "1.0")
        evil = Model("tiny", "2.0", "models/tiny/2.0/model.gguf", 5, "00" * 32)
        agent = fleet.agent()
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", good.target(), sequence=5))
        await activated(control, "kiosk-1", good, 5)
        before = len(control.events("kiosk-1"))
        attacker = Director(Ed25519PrivateKey.generate())
        listed_other = fleet.repository.add("other", "1.0")
        documents = {
            "forged": attacker.sign("kiosk-1", listed_other.target(), sequence=9),
            "replayed": fleet.director.sign("kiosk-1", listed_other.target(), sequence=4),
            "other-device": fleet.director.sign("kiosk-2", listed_other.target(), sequence=9),
            "expired": fleet.director.sign(
                "kiosk-1", listed_other.target(), sequence=9, expires_in_s=-10
            ),
            "not-in-tuf": fleet.director.sign("kiosk-1", evil.target(), sequence=9),
            "wrong-hash": fleet.director.sign(
                "kiosk-1",
                TargetRef(listed_other.path, listed_other.length, "11" * 32),
                sequence=9,
            ),
        }
        await control.desired("kiosk-1", documents[attack])
        expected = (
            "install_failed" if attack in ("not-in-tuf", "wrong-hash") else "desired_rejected"
        )
        await control.wait_for(
            lambda: expected in kinds(control, "kiosk-1")[before:], f"{expected} for {attack}"
        )
        assert "activated" not in kinds(control, "kiosk-1")[before:]
        assert await served(agent) == "tiny"
        assert agent.request("GET", "/readyz")[0] == 200

    async def test_a_newer_desired_state_cancels_a_download_in_progress(
        self, fleet: Fleet, control: Counterpart, short_tmp: Path
    ):
        """Latest wins: while a big model downloads slowly, a newer desired state cancels it
        and the newer target is what runs."""
        big = short_tmp / "big.gguf"
        big.write_bytes(TINY_GGUF.read_bytes() + b"\0" * (8 << 20))
        slow = fleet.repository.add("slow", "1.0", big)
        quick = fleet.repository.add("tiny", "1.0")
        fleet.repository.serve(bytes_per_s=256 << 10)
        fleet.agent()
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", slow.target()))
        await control.wait_for(
            lambda: "download_started" in kinds(control, "kiosk-1"), "the slow download"
        )
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", quick.target()))
        await control.wait_for(
            lambda: "install_cancelled" in kinds(control, "kiosk-1"), "the cancel"
        )
        event = await activated(control, "kiosk-1", quick, 2)
        assert event.model == quick.ref


class TestRemoteJobs:
    async def test_a_remote_job_runs_and_its_result_is_acknowledged_end_to_end(
        self, fleet: Fleet, control: Counterpart
    ):
        """A job from the fleet enters the durable queue, runs on the named model, and its
        result leaves the outbox only once the control plane acknowledged it."""
        model = fleet.repository.add("tiny", "1.0")
        agent = fleet.agent()
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", model.target()))
        await activated(control, "kiosk-1", model, 1)
        job_id = await control.job(
            "kiosk-1", {"model": "tiny", "prompt": "hello", "max_tokens": 3}, metadata={"n": 1}
        )
        results = await control.wait_for(
            lambda: control.results("kiosk-1", job_id), "the job's result"
        )
        _, body = results[0]
        assert body.state == "succeeded"
        assert body.metadata == {"n": 1}
        assert body.result is not None
        await control.wait_for(
            lambda: agent.request("GET", "/v1/sync")[1]["outbox"]["result"] == 0,
            "the acknowledged result to leave the outbox",
        )

    async def test_a_job_delivered_twice_runs_once(self, fleet: Fleet, control: Counterpart):
        """QoS 1 may deliver a job twice: the same message id is one job on the device."""
        agent = fleet.agent()
        request: dict[str, Any] = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        envelope = new_envelope(
            RemoteJob(request=request, wait_for_model=True), sender="control", ts_ms=1
        )
        for _ in range(2):
            await control.send_raw(control.topic("kiosk-1", Channel.JOBS), encode(envelope))
        await control.wait_for(
            lambda: agent.request("GET", "/v1/jobs?limit=500")[1]["data"], "the job"
        )
        await asyncio.sleep(1)  # room for a second copy to be (wrongly) stored
        jobs = agent.request("GET", "/v1/jobs?limit=500")[1]["data"]
        assert len(jobs) == 1
        assert jobs[0]["idempotency_key"] == f"fleet:{envelope.id}"

    async def test_a_job_past_the_queue_cap_is_refused_and_reported(
        self, fleet: Fleet, control: Counterpart
    ):
        """max_queued_jobs holds for fleet jobs too: past it, a job is refused with
        job_queue_full in its result (not left unacknowledged to come back for ever)."""
        agent = fleet.agent(env={"EDGELM_MAX_QUEUED_JOBS": "1"})
        request: dict[str, Any] = {"model": "absent", "prompt": "hi", "max_tokens": 2}
        first = await control.job("kiosk-1", request, wait_for_model=True)
        await control.wait_for(
            lambda: agent.request("GET", "/v1/jobs?limit=500")[1]["data"], "the first job"
        )
        second = await control.job("kiosk-1", request, wait_for_model=True)
        results = await control.wait_for(lambda: control.results("kiosk-1", second), "the refusal")
        _, body = results[0]
        assert body.state == "failed"
        assert body.error is not None
        assert body.error.code == "job_queue_full"
        assert not control.results("kiosk-1", first)  # still waiting for its model
        jobs = agent.request("GET", "/v1/jobs?limit=500")[1]["data"]
        assert len(jobs) == 1


class TestResilience:
    async def test_results_wait_in_the_outbox_until_acknowledged(self, fleet: Fleet):
        """Without the control plane's acknowledgement, a result is sent again (the broker's
        PUBACK is not enough), and it goes once acknowledged."""
        model = fleet.repository.add("tiny", "1.0")
        agent = fleet.agent()
        async with counterpart(fleet.broker.port, auto_ack=False) as silent:
            await silent.desired("kiosk-1", fleet.director.sign("kiosk-1", model.target()))
            await activated(silent, "kiosk-1", model, 1)
            job_id = await silent.job("kiosk-1", {"model": "tiny", "prompt": "x", "max_tokens": 2})

            def copies() -> list[tuple[str, JobResult]]:
                return silent.results("kiosk-1", job_id)

            await silent.wait_for(lambda: len(copies()) >= 2, "the result to be sent again")
            assert len({message_id for message_id, _ in copies()}) == 1  # deduplicable
            await silent.ack("kiosk-1", [copies()[0][0]])
            await silent.wait_for(
                lambda: agent.request("GET", "/v1/sync")[1]["outbox"]["result"] == 0,
                "the result to leave the outbox",
            )

    async def test_the_agent_serves_while_the_broker_is_down_and_catches_up(
        self, fleet: Fleet, control: Counterpart
    ):
        """Offline is normal: with the broker stopped the agent serves and queues; when it
        is back, what was queued arrives."""
        model = fleet.repository.add("tiny", "1.0")
        agent = fleet.agent()
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", model.target()))
        await activated(control, "kiosk-1", model, 1)
        fleet.broker.stop()
        status, job = agent.request(
            "POST",
            "/v1/jobs",
            {"request": {"model": "tiny", "prompt": "hi", "max_tokens": 2}, "report": "upstream"},
        )
        assert status == 202
        assert await served(agent) == "tiny"
        assert agent.request("GET", "/readyz")[0] == 200
        fleet.broker.start()
        await control.wait_for(
            lambda: control.results("kiosk-1", job["id"]),
            "the queued result after the broker came back",
            timeout_s=180,
        )

    async def test_hostile_messages_on_every_inbound_topic_change_nothing(
        self, fleet: Fleet, control: Counterpart
    ):
        """Malformed, oversized and wrong-type messages on desired, jobs, ack and announce
        are dropped; the agent keeps serving and syncing."""
        model = fleet.repository.add("tiny", "1.0")
        agent = fleet.agent()
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", model.target()))
        await activated(control, "kiosk-1", model, 1)
        for channel in (Channel.DESIRED, Channel.JOBS, Channel.ACK):
            topic = control.topic("kiosk-1", channel)
            for payload in (b"\xff\xfe", b"{}", b"[]", b'{"v": 2}', b"x" * 300_000):
                await control.send_raw(topic, payload)
        await control.send_raw("edgelm/v1/acme/announce", b"not json")
        job_id = await control.job("kiosk-1", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        await control.wait_for(lambda: control.results("kiosk-1", job_id), "a job after the junk")
        assert agent.request("GET", "/readyz")[0] == 200
        dropped = agent.log_events("sync_message_dropped")
        assert len(dropped) >= 10

    async def test_kill_9_mid_download_resumes_and_activates(
        self, fleet: Fleet, control: Counterpart, short_tmp: Path
    ):
        """The agent killed in the middle of a download restarts, resumes it from where it
        stopped (the desired state is retained), and activates the model."""
        big = short_tmp / "big.gguf"
        big.write_bytes(TINY_GGUF.read_bytes() + b"\0" * (4 << 20))
        model = fleet.repository.add("big", "1.0", big)
        fleet.repository.serve(stall_after=2 << 20)
        agent = fleet.agent()
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", model.target()))
        partial_dir = agent.workdir / "state" / "registry" / "staging"
        await control.wait_for(
            lambda: any(p.stat().st_size >= 1 << 20 for p in partial_dir.glob("*.partial")),
            "half the download",
        )
        agent.signal(signal.SIGKILL)
        agent.wait()
        fleet.repository.serve()
        again = AgentProcess(agent.workdir, model=None, env={"EDGELM_TELEMETRY_INTERVAL_S": "1"})
        fleet.agents.append(again)
        again.wait_alive()
        await activated(control, "kiosk-1", model, 1)
        assert await served(again) == "big"


class TestTelemetry:
    async def test_telemetry_batches_arrive(self, fleet: Fleet, control: Counterpart):
        """Every telemetry interval a batch arrives, with the device's figures."""
        fleet.agent()
        batches = await control.wait_for(
            lambda: control.telemetry("kiosk-1")[1:], "two telemetry batches"
        )
        body = batches[0]
        assert body.window_s > 0
        assert (body.memory_bytes or 0) > 0
        assert (body.disk_free_bytes or 0) > 0
