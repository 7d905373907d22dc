"""The agent's fleet sync against a real Mosquitto, a repository over real HTTP, and the
control plane's end of the wire played by the protocol package: enrollment, desired states
(and every attack on them), remote jobs, end-to-end acknowledgements, telemetry, faults."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgelm_protocol import (
    Ack,
    Announce,
    DesiredDocument,
    Event,
    EventKind,
    JobResult,
    RemoteJob,
    ReportedState,
    TargetRef,
    encode,
    new_envelope,
)
from edgelm_protocol.bodies import Body
from edgelm_protocol.topics import Channel
from tests.agent_process import REPO, TINY_GGUF, AgentProcess
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
from tests.static_server import REQUEST_LOG_ENV

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


async def online(side: Counterpart, device: str) -> None:
    """The device is subscribed: it says it is online only after its SUBACK. A message that
    is not retained, sent before that, is lost (the device's session does not exist yet)."""
    await side.wait_for(lambda: side.of(device, "presence"), f"{device} online")


def dropped(agent: AgentProcess) -> list[tuple[str, str]]:
    """(topic, code) of every message the agent logged as dropped, in the order it did."""
    return [(r["topic"], r["code"]) for r in agent.log_events("sync_message_dropped")]


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


def edgelm_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``edgelm ...`` as a subprocess, as a person on the device runs it."""
    return subprocess.run(
        [sys.executable, "-m", "edgelm_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


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
        # The fleet lists the very bytes the device holds, and they stay in its store under
        # that digest: a rollout of the fleet's version fetches nothing.
        digest = hashlib.sha256(TINY_GGUF.read_bytes()).hexdigest()
        assert listed.sha256 == digest
        blob = short_tmp / "d/state/registry/blobs/sha256" / digest
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest

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

    def test_enrolling_in_another_fleet_refreshes_from_the_new_repository_only(
        self, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
    ):
        """enroll --replace into another fleet checks the installed models against the NEW
        fleet's repository: the previous fleet's server gets no request, and a model the new
        fleet lists with the same hash is kept."""
        repositories, logs = [], []
        for name in ("old", "new"):
            (short_tmp / name).mkdir()
            repository = Repository(short_tmp / name)
            model = repository.add("tiny", "1.0")  # the same bytes in both fleets
            logs.append(short_tmp / f"{name}-requests.jsonl")
            monkeypatch.setenv(REQUEST_LOG_ENV, str(logs[-1]))
            repository.serve()
            repositories.append(repository)
        old, new = repositories
        old_log, new_log = logs
        state = short_tmp / "state"
        try:
            first = bundle(short_tmp / "old.json", "kiosk-1", old, Director(), 1)
            assert enroll(state, first).returncode == 0
            installed = edgelm_cli("models", "install", model.ref, "--state-dir", state, "--json")
            assert installed.returncode == 0, installed.stderr
            requests_before = old_log.read_text()
            second = bundle(short_tmp / "new.json", "kiosk-1", new, Director(), 1, fleet="globex")
            result = edgelm_cli(
                "agent", "enroll", second, "--state-dir", state, "--replace", "--json"
            )
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            assert report["fleet"] == "globex"
            assert report["repository_reachable"] is True
            assert (report["models_kept"], report["models_dropped"]) == ([model.ref], [])
            assert old_log.read_text() == requests_before  # not one request to the old fleet
            paths = [json.loads(line)["path"] for line in new_log.read_text().splitlines()]
            assert "/metadata/timestamp.json" in paths
        finally:
            for repository in repositories:
                repository.stop()

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
        ("attack", "kind", "code"),
        [
            ("forged", "desired_rejected", "forged_desired_state"),
            ("no-signature", "desired_rejected", "forged_desired_state"),
            ("replayed", "desired_rejected", "stale_desired_state"),
            ("other-device", "desired_rejected", "wrong_device"),
            ("expired", "desired_rejected", "expired_desired_state"),
            ("not-in-tuf", "install_failed", "target_mismatch"),
            ("wrong-hash", "install_failed", "target_mismatch"),
        ],
    )
    async def test_attacks_are_refused_and_the_active_model_serves_on(
        self, fleet: Fleet, control: Counterpart, attack: str, kind: str, code: str
    ):
        """Whoever owns the broker cannot make the device run a model: each attack is
        refused (logged as dropped with its code, and reported with it), and the model that
        was active keeps serving."""
        good = fleet.repository.add("tiny", "1.0")
        evil = Model("tiny", "2.0", "models/tiny/2.0/model.gguf", 5, "00" * 32)
        agent = fleet.agent()
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", good.target(), sequence=5))
        await activated(control, "kiosk-1", good, 5)
        before = len(control.events("kiosk-1"))
        attacker = Director(Ed25519PrivateKey.generate())
        listed_other = fleet.repository.add("other", "1.0")
        # The director's own document for a listed target, its signature stripped: only the
        # missing signature is wrong with it.
        genuine = fleet.director.sign("kiosk-1", listed_other.target(), sequence=9)
        documents = {
            "forged": attacker.sign("kiosk-1", listed_other.target(), sequence=9),
            "no-signature": DesiredDocument(signed=genuine.signed, signatures=()),
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
        assert dropped(agent) == []
        await control.desired("kiosk-1", documents[attack])

        def refusals() -> list[Event]:
            return [e for e in control.events("kiosk-1")[before:] if e.kind.value == kind]

        refusal = (await control.wait_for(refusals, f"{kind} for {attack}"))[0]
        assert refusal.reason is not None
        assert refusal.reason.startswith(f"{code}: "), refusal.reason
        if attack == "no-signature":
            assert "no signatures" in refusal.reason
        if kind == "desired_rejected":
            # Refused before anything was acted on, and logged with the same code.
            assert dropped(agent) == [(control.topic("kiosk-1", Channel.DESIRED), code)]
            assert kinds(control, "kiosk-1")[before:] == ["desired_rejected"]
        else:
            # A signed state for a target TUF does not vouch for: accepted, never installed.
            assert dropped(agent) == []
            assert "installed" not in kinds(control, "kiosk-1")[before:]
        assert "activated" not in kinds(control, "kiosk-1")[before:]
        assert await served(agent) == "tiny"
        assert agent.request("GET", "/readyz")[0] == 200
        _, registry = agent.request("GET", "/v1/registry/models")
        assert registry["active"] == good.ref

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
        await online(control, "kiosk-1")
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
        await online(control, "kiosk-1")
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

    async def test_a_job_for_a_model_the_device_cannot_get_is_refused_unless_it_may_wait(
        self, fleet: Fleet, control: Counterpart
    ):
        """As on the local API: a job naming a model neither installed nor offered ends at
        once with model_not_found in its result, instead of waiting for ever; with
        wait_for_model it is queued. A model the repository offers counts, by name and by
        name@version."""
        fleet.repository.add("tiny", "1.0")  # offered, not installed
        agent = fleet.agent()
        await online(control, "kiosk-1")
        offered = await control.job(
            "kiosk-1", {"model": "tiny@1.0", "prompt": "hi", "max_tokens": 2}
        )
        request: dict[str, Any] = {"model": "absent", "prompt": "hi", "max_tokens": 2}
        refused = await control.job("kiosk-1", request)
        results = await control.wait_for(lambda: control.results("kiosk-1", refused), "refusal")
        _, body = results[0]
        assert body.state == "failed"
        assert body.error is not None
        assert body.error.code == "model_not_found"
        assert not control.results("kiosk-1", offered)  # queued, waiting for its model
        jobs = agent.request("GET", "/v1/jobs?limit=500")[1]["data"]
        assert [(j["model"], j["state"]) for j in jobs] == [("tiny@1.0", "queued")]
        await control.job("kiosk-1", request, wait_for_model=True)
        queued = await control.wait_for(
            lambda: len(agent.request("GET", "/v1/jobs?limit=500")[1]["data"]) == 2,
            "the waiting job",
        )
        assert queued


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
        are each dropped with their own code; the agent keeps serving and syncing, and a valid
        desired state after them is applied."""
        model = fleet.repository.add("tiny", "1.0")
        other = fleet.repository.add("other", "1.0")
        agent = fleet.agent()
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", model.target()))
        await activated(control, "kiosk-1", model, 1)
        assert dropped(agent) == []
        # A well-formed envelope of another channel's type, for each channel.
        wrong_type: dict[Channel, Body] = {
            Channel.DESIRED: Ack(ids=("0" * 32,)),
            Channel.JOBS: Director().sign("kiosk-1", other.target()),
            Channel.ACK: RemoteJob(request={"model": "tiny", "prompt": "x", "max_tokens": 2}),
        }
        hostile: list[tuple[bytes, str]] = [
            (b"\xff\xfe", "malformed_message"),  # not UTF-8
            (b"{}", "malformed_message"),  # no version
            (b"[]", "malformed_message"),  # not an object
            (b'{"v": 2}', "unsupported_version"),
            (b"x" * 300_000, "message_too_large"),  # over every channel's limit
        ]
        expected: list[tuple[str, str]] = []
        for channel in (Channel.DESIRED, Channel.JOBS, Channel.ACK):
            topic = control.topic("kiosk-1", channel)
            envelope = new_envelope(wrong_type[channel], sender="control", ts_ms=1)
            for payload, code in [*hostile, (encode(envelope), "topic_mismatch")]:
                await control.send_raw(topic, payload)
                expected.append((topic, code))
        announce = "edgelm/v1/acme/announce"
        await control.send_raw(announce, b"not json")
        expected.append((announce, "malformed_message"))
        job_id = await control.job("kiosk-1", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        await control.wait_for(lambda: control.results("kiosk-1", job_id), "a job after the junk")
        await control.wait_for(lambda: len(dropped(agent)) >= len(expected), "every drop logged")
        # Exactly these, each with its code. MQTT keeps the order within a topic only.
        assert sorted(dropped(agent)) == sorted(expected)
        for topic in {t for t, _ in expected}:
            assert [d for d in dropped(agent) if d[0] == topic] == [
                e for e in expected if e[0] == topic
            ]
        assert not [e for e in control.events("kiosk-1") if e.kind == EventKind.DESIRED_REJECTED]
        assert agent.request("GET", "/readyz")[0] == 200
        assert await served(agent) == "tiny"
        # Still syncing: the next desired state is applied.
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", other.target(), sequence=2))
        await activated(control, "kiosk-1", other, 2)
        assert await served(agent) == "other"
        assert sorted(dropped(agent)) == sorted(expected)  # and nothing more was dropped

    async def test_kill_9_mid_download_resumes_and_activates(
        self,
        fleet: Fleet,
        control: Counterpart,
        short_tmp: Path,
        monkeypatch: pytest.MonkeyPatch,
    ):
        """The agent killed in the middle of a download restarts, resumes it with a Range
        request from where it stopped (the desired state is retained), and activates the
        model, verified."""
        big = short_tmp / "big.gguf"
        big.write_bytes(TINY_GGUF.read_bytes() + b"\0" * (4 << 20))
        model = fleet.repository.add("big", "1.0", big)
        stall_at = 2 << 20  # a mirror that hangs here: the kill finds exactly this much
        first_log, second_log = short_tmp / "requests-1.jsonl", short_tmp / "requests-2.jsonl"
        monkeypatch.setenv(REQUEST_LOG_ENV, str(first_log))
        fleet.repository.serve(stall_after=stall_at)
        agent = fleet.agent()
        await control.desired("kiosk-1", fleet.director.sign("kiosk-1", model.target()))
        partial = agent.workdir / "state" / "registry" / "staging" / f"{model.sha256}.partial"
        await control.wait_for(
            lambda: partial.exists() and partial.stat().st_size == stall_at,
            "the download up to the stall",
        )
        agent.signal(signal.SIGKILL)
        assert agent.wait() == -signal.SIGKILL
        assert partial.stat().st_size == stall_at  # kept: a kill loses nothing written
        assert not [e for e in control.events("kiosk-1") if e.kind == EventKind.INSTALLED]
        monkeypatch.setenv(REQUEST_LOG_ENV, str(second_log))
        fleet.repository.serve()
        again = AgentProcess(agent.workdir, model=None, env={"EDGELM_TELEMETRY_INTERVAL_S": "1"})
        fleet.agents.append(again)
        again.wait_alive()
        await activated(control, "kiosk-1", model, 1)
        assert await served(again) == "big"

        def fetches(log: Path) -> list[tuple[str | None, int]]:
            lines = [json.loads(line) for line in log.read_text().splitlines()]
            # The file is served under its hash-prefixed name (TUF consistent snapshots).
            folder = f"/targets/{model.path.rsplit('/', 1)[0]}/"
            return [(r["range"], r["status"]) for r in lines if r["path"].startswith(folder)]

        assert fetches(first_log) == [(None, 200)]  # the first attempt, from byte 0
        assert fetches(second_log) == [(f"bytes={stall_at}-", 206)]  # only the rest
        _, registry = again.request("GET", "/v1/registry/models")
        assert registry["active"] == model.ref
        _, verified = again.request("POST", "/v1/registry/verify", {"model": model.ref})
        assert verified["ok"] is True, verified
        blob = again.workdir / "state" / "registry" / "blobs" / "sha256" / model.sha256
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == model.sha256
        assert not partial.exists()


class TestAnnounce:
    @pytest.mark.parametrize(
        ("case", "code"),
        [("oversized", "message_too_large"), ("wrong-body-types", "malformed_message")],
    )
    async def test_a_hostile_announce_is_dropped_acknowledged_and_sync_goes_on(
        self, fleet: Fleet, control: Counterpart, case: str, code: str
    ):
        """announce reaches every device of the fleet, so a bad one must cost nothing: each
        is logged and dropped with its code, and acknowledged. More of them than the agent's
        receive maximum (20) arrive: were one left unacknowledged, the broker would hold back
        what follows them, so the valid announce after them (exactly at the 1 KiB limit) is
        heard only if all were acknowledged. Jobs still flow too."""
        agent = fleet.agent()
        await online(control, "kiosk-1")
        topic = "edgelm/v1/acme/announce"
        bodies: list[Any] = [
            {"timestamp_version": "7"},
            {"timestamp_version": 7.5},
            {"timestamp_version": True},
            {"timestamp_version": None},
            {"timestamp_version": [7]},
            {"timestamp_version": {"v": 7}},
            [7],
            "7",
            None,
        ]
        payloads = []
        for n in range(25):
            if case == "oversized":
                payloads.append(announce_payload(7, size=1025 + n * 4096))
            else:
                payloads.append(announce_payload(7, body=bodies[n % len(bodies)]))
        for payload in payloads:
            await control.send_raw(topic, payload)
        await control.send_raw(topic, announce_payload(8, size=1024))
        announced = await control.wait_for(
            lambda: agent.log_events("repository_announced"), "the valid announce after them"
        )
        assert [r["timestamp_version"] for r in announced] == [8]
        assert dropped(agent) == [(topic, code)] * len(payloads)
        # A job that cannot run (it asks to stream) is refused at once, with a result.
        request = {"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True}
        job_id = await control.job("kiosk-1", request)
        results = await control.wait_for(lambda: control.results("kiosk-1", job_id), "a job")
        assert results[0][1].state == "failed"
        assert agent.request("GET", "/healthz")[0] == 200
        assert agent.request("GET", "/v1/sync")[1]["broker"]["connected"] is True
        assert dropped(agent) == [(topic, code)] * len(payloads)


_REAL = object()


def announce_payload(timestamp_version: int, *, body: Any = _REAL, size: int = 0) -> bytes:
    """An announce envelope from the control plane, with ``body`` instead of the real one if
    given, padded with trailing whitespace (valid JSON) to ``size`` bytes."""
    real = new_envelope(Announce(timestamp_version), sender="control", ts_ms=1)
    document: dict[str, Any] = dict(real.to_json())
    if body is not _REAL:
        document["body"] = body
    payload = json.dumps(document).encode()
    assert len(payload) <= max(size, 1024)
    return payload + b" " * (size - len(payload))


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
