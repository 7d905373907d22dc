"""What a real agent does with a desired state when things go wrong or are undone: a
repository that is away for a while (retried, not failed), a failure that is final (reported
once), and a release (a signed desired state with no target, which an aborted rollout sends).

The control plane's end of the wire is played by the protocol package, as in test_sync.py.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edgelm_protocol import EventKind, ReportedState, TargetRef, encode, new_envelope
from edgelm_protocol.bodies import Announce
from edgelm_protocol.topics import Topic
from tests.agent_process import TINY_GGUF, AgentProcess
from tests.fleet_harness import (
    FLEET,
    Counterpart,
    Director,
    Model,
    Repository,
    counterpart,
    enrolled_agent,
)
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.timeout(300)

DEVICE = "kiosk-1"
# Retries come quickly here; the defaults are 5 s doubling to 300 s.
FAST_RETRY = {"EDGELM_SYNC_RETRY_MIN_S": "0.3", "EDGELM_SYNC_RETRY_MAX_S": "0.6"}


class Setup:
    def __init__(self, workdir: Path, broker: Mosquitto) -> None:
        self.workdir = workdir
        self.broker = broker
        self.repository = Repository(workdir)
        self.director = Director()
        self.agents: list[AgentProcess] = []

    def agent(self, **env: str) -> AgentProcess:
        agent = enrolled_agent(
            self.workdir / DEVICE,
            DEVICE,
            self.repository,
            self.director,
            self.broker.port,
            env=FAST_RETRY | env,
        )
        self.agents.append(agent)
        return agent


@pytest.fixture
def setup(short_tmp: Path, mosquitto: Mosquitto) -> Iterator[Setup]:
    made = Setup(short_tmp, mosquitto)
    made.repository.serve()
    try:
        yield made
    finally:
        for agent in made.agents:
            agent.stop()
        made.repository.stop()


@pytest.fixture
async def control(setup: Setup) -> AsyncIterator[Counterpart]:
    async with counterpart(setup.broker.port) as side:
        yield side


def events(side: Counterpart, kind: EventKind) -> list[tuple[int | None, str | None, str | None]]:
    return [(e.desired_sequence, e.model, e.reason) for e in side.events(DEVICE) if e.kind == kind]


async def outcome(side: Counterpart, kind: EventKind, sequence: int) -> None:
    await side.wait_for(
        lambda: any(s == sequence for s, _m, _r in events(side, kind)),
        f"{kind.value} for desired state {sequence}",
    )


async def reported(side: Counterpart, sequence: int) -> ReportedState:
    def find() -> ReportedState | None:
        for envelope in reversed(side.of(DEVICE, "state")):
            body = envelope.body
            if isinstance(body, ReportedState) and body.desired_sequence >= sequence:
                return body
        return None

    state: ReportedState = await side.wait_for(find, f"the state after desired {sequence}")
    return state


def served(agent: AgentProcess) -> str | None:
    status, body = agent.request("GET", "/v1/models")
    assert status == 200
    return body["data"][0]["id"] if body["data"] else None


async def run(setup: Setup, side: Counterpart, model: Model, rollout: str) -> int:
    """Send ``model`` for ``rollout`` and wait until it is active; its sequence."""
    document = setup.director.sign(DEVICE, model.target(), rollout=rollout)
    await side.desired(DEVICE, document)
    sequence = setup.director.sequences[DEVICE]
    await outcome(side, EventKind.ACTIVATED, sequence)
    return sequence


async def release(setup: Setup, side: Counterpart, rollout: str) -> int:
    await side.desired(DEVICE, setup.director.sign(DEVICE, None, rollout=rollout))
    return setup.director.sequences[DEVICE]


class TestRetries:
    async def test_a_repository_away_for_a_while_is_retried_until_the_model_runs(
        self, setup: Setup, control: Counterpart
    ):
        """The repository is down when the desired state arrives: the device does not give
        up (it used to report install_failed and count the state applied); it says it
        retries, and installs once the repository is back."""
        model = setup.repository.add("tiny", "1.0")
        agent = setup.agent()
        await control.wait_for(lambda: control.of(DEVICE, "presence"), "presence")
        setup.repository.stop()
        await control.desired(DEVICE, setup.director.sign(DEVICE, model.target()))
        await control.wait_for(
            lambda: [
                r
                for _s, _m, r in events(control, EventKind.DOWNLOAD_RETRYING)
                if r and r.startswith("retry 2 ")
            ],
            "two retries",
        )
        assert events(control, EventKind.INSTALL_FAILED) == []
        setup.repository.serve()
        await outcome(control, EventKind.ACTIVATED, 1)
        assert events(control, EventKind.INSTALL_FAILED) == []
        assert served(agent) == "tiny"
        retries = agent.log_events("desired_state_install_retry")
        assert retries
        assert "download_failed" in retries[0]["error"]

    async def test_a_final_failure_is_reported_once_and_not_retried(
        self, setup: Setup, control: Counterpart
    ):
        """A target whose hash is not the one the signed metadata lists will never install:
        one install_failed, no retries, and the state counts as applied."""
        model = setup.repository.add("tiny", "1.0")
        agent = setup.agent()
        await control.wait_for(lambda: control.of(DEVICE, "presence"), "presence")
        wrong = TargetRef(path=model.path, length=model.length, sha256="0" * 64)
        await control.desired(DEVICE, setup.director.sign(DEVICE, wrong))
        await outcome(control, EventKind.INSTALL_FAILED, 1)
        state = await reported(control, 1)
        assert state.active is None
        assert events(control, EventKind.DOWNLOAD_RETRYING) == []
        assert len(events(control, EventKind.INSTALL_FAILED)) == 1
        assert agent.log_events("desired_state_install_retry") == []

    async def test_a_blob_the_repository_does_not_have_is_final_not_retried(
        self, setup: Setup, control: Counterpart
    ):
        """The metadata lists the model but the server answers 404 for its file: asking
        again will not help, so it is reported once as install_failed (download_refused)."""
        model = setup.repository.add("tiny", "1.0")
        for blob in (setup.repository.root / "targets").rglob("*.gguf"):
            blob.unlink()
        agent = setup.agent()
        await control.wait_for(lambda: control.of(DEVICE, "presence"), "presence")
        await control.desired(DEVICE, setup.director.sign(DEVICE, model.target()))
        await outcome(control, EventKind.INSTALL_FAILED, 1)
        [(_s, _m, reason)] = events(control, EventKind.INSTALL_FAILED)
        assert reason is not None
        assert reason.startswith("download_refused: ")
        assert "HTTP 404" in reason
        assert events(control, EventKind.DOWNLOAD_RETRYING) == []
        assert agent.log_events("desired_state_install_retry") == []

    async def test_a_renewed_desired_state_continues_the_download_in_progress(
        self, setup: Setup, control: Counterpart, short_tmp: Path
    ):
        """The director re-signs a state before it expires (same target, newer sequence):
        the slow download goes on, nothing is cancelled or fetched twice, and the outcome
        counts for the newer sequence."""
        big = short_tmp / "big.gguf"
        big.write_bytes(TINY_GGUF.read_bytes() + b"\0" * (4 << 20))
        model = setup.repository.add("slow", "1.0", big)
        setup.repository.serve(bytes_per_s=512 << 10)
        agent = setup.agent()
        await control.wait_for(lambda: control.of(DEVICE, "presence"), "presence")
        await control.desired(DEVICE, setup.director.sign(DEVICE, model.target(), rollout="r"))
        await outcome(control, EventKind.DOWNLOAD_STARTED, 1)
        await control.desired(DEVICE, setup.director.sign(DEVICE, model.target(), rollout="r"))
        await outcome(control, EventKind.ACTIVATED, 1)
        state = await reported(control, 2)
        assert state.active is not None
        assert state.active.key == model.ref
        assert events(control, EventKind.INSTALL_CANCELLED) == []
        assert len(events(control, EventKind.DOWNLOAD_STARTED)) == 1
        assert agent.log_events("desired_state_renewed")


class TestRelease:
    async def test_a_release_unloads_what_its_rollout_activated_on_a_device_that_ran_nothing(
        self, setup: Setup, control: Counterpart
    ):
        """The first rollout to a device is aborted after it switched: the release leaves it
        serving no model, as before the rollout, and a restart does not bring it back."""
        model = setup.repository.add("tiny", "1.0")
        agent = setup.agent()
        await run(setup, control, model, "ro-first")
        assert served(agent) == "tiny"
        sequence = await release(setup, control, "ro-first")
        state = await reported(control, sequence)
        assert state.active is None
        assert served(agent) is None
        _status, registry = agent.request("GET", "/v1/registry/models")
        assert registry["active"] is None
        assert any(m["ref"] == model.ref for m in registry["models"])  # kept, not active
        assert agent.log_events("model_deactivated")
        assert agent.stop() == 0
        again = AgentProcess(agent.workdir, model=None, env=FAST_RETRY).wait_alive()
        setup.agents.append(again)
        assert served(again) is None

    async def test_a_release_goes_back_to_the_model_before_the_rollout(
        self, setup: Setup, control: Counterpart
    ):
        """v1 came with one rollout, v2 with the next, which is aborted: back on v1, reported
        as rolled_back for the release's sequence."""
        v1 = setup.repository.add("tiny", "1.0")
        v2 = setup.repository.add("tiny", "2.0")
        agent = setup.agent()
        await run(setup, control, v1, "ro-1")
        await run(setup, control, v2, "ro-2")
        sequence = await release(setup, control, "ro-2")
        await outcome(control, EventKind.ROLLED_BACK, sequence)
        assert (sequence, v1.ref) in [(s, m) for s, m, _r in events(control, EventKind.ROLLED_BACK)]
        state = await reported(control, sequence)
        assert state.active is not None
        assert state.active.key == v1.ref
        _status, registry = agent.request("GET", "/v1/registry/models")
        assert registry["active"] == v1.ref

    async def test_a_release_for_another_rollout_leaves_the_model_alone(
        self, setup: Setup, control: Counterpart
    ):
        """A release undoes only its own rollout's switch: what another rollout (or a local
        operator) activated stays."""
        model = setup.repository.add("tiny", "1.0")
        agent = setup.agent()
        await run(setup, control, model, "ro-1")
        sequence = await release(setup, control, "ro-other")
        state = await reported(control, sequence)
        assert state.active is not None
        assert state.active.key == model.ref
        assert served(agent) == "tiny"
        assert events(control, EventKind.ROLLED_BACK) == []


class TestReleaseRaces:
    async def test_a_release_right_after_an_assignment_waits_for_the_activation(
        self, setup: Setup, control: Counterpart
    ):
        """An abort lands while the rollout's model is still being activated: the release
        waits for the activation to finish, then undoes it. The device ends with no model,
        never with the aborted one."""
        model = setup.repository.add("tiny", "1.0")
        agent = setup.agent()
        await control.wait_for(lambda: control.of(DEVICE, "presence"), "presence")
        await control.desired(DEVICE, setup.director.sign(DEVICE, model.target(), rollout="r"))
        await outcome(control, EventKind.INSTALLED, 1)  # activation starts now
        sequence = await release(setup, control, "r")
        state = await reported(control, sequence)
        assert state.active is None
        assert served(agent) is None
        # The event travels through the outbox, on its own beside the reported state.
        await outcome(control, EventKind.DEACTIVATED, sequence)


class TestObservability:
    async def test_readyz_and_metrics_show_the_link_the_applied_state_and_the_outbox(
        self, setup: Setup, control: Counterpart
    ):
        """An operator at the device sees the fleet link in /readyz and /metrics."""
        model = setup.repository.add("tiny", "1.0")
        agent = setup.agent()
        sequence = await run(setup, control, model, "ro-1")
        await reported(control, sequence)

        def ready_sync() -> dict[str, object] | None:
            status, body = agent.request("GET", "/readyz")
            sync = body.get("sync") if status == 200 else None
            return sync if sync and sync["applied_sequence"] == sequence else None

        sync = await control.wait_for(ready_sync, "/readyz with the applied sequence")
        assert sync["connected"] is True
        assert set(sync["outbox"]) == {"result", "event", "telemetry"}
        text = await metrics_text(agent)
        assert "edgelm_sync_connected 1.0" in text
        assert f"edgelm_desired_sequence {float(sequence)}" in text
        assert 'edgelm_outbox_messages{kind="event"}' in text

    async def test_an_announcement_makes_the_device_refresh_its_metadata(
        self, setup: Setup, control: Counterpart
    ):
        """The control plane announces a new timestamp: the device fetches and verifies the
        new metadata (it learns of the new model) without waiting for a desired state."""
        setup.repository.add("tiny", "1.0")
        agent = setup.agent(EDGELM_SYNC_REFRESH_JITTER_S="0")
        await control.wait_for(lambda: control.of(DEVICE, "presence"), "presence")
        setup.repository.add("tiny", "2.0")
        announce = Announce(timestamp_version=2)
        payload = encode(new_envelope(announce, sender="control", ts_ms=int(time.time() * 1000)))
        await control.send_raw(Topic.announce(FLEET).value, payload)
        refreshed = await control.wait_for(
            lambda: agent.log_events("repository_refreshed"), "the refresh"
        )
        assert refreshed[0]["offered"] == 2
        status, body = agent.request("GET", "/v1/registry/available")
        assert status == 200
        assert {m["version"] for m in body["models"]} == {"1.0", "2.0"}


async def metrics_text(agent: AgentProcess) -> str:
    async with agent.unix_session() as session, session.get("http://agent/metrics") as response:
        assert response.status == 200
        return await response.text()
