"""``rollouts watch``: fed by the event stream, falling back to polling, ending with the rollout.

The watcher is driven from the test's side through the fake control plane's hooks, which
change a rollout the way the real engine will and publish the matching events. To show which
feed did the work, the other is made useless: a watcher that may only poll once an hour can
only finish through the stream, and one whose stream is refused only by polling.

These should move to the real control plane, with real devices, once it exists.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from edgelm_provisioning.control_client import ControlClient
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.rollout_watch import FeedMode, RolloutWatcher, WatchSettings
from tests.agent_process import TINY_GGUF
from tests.integration.provisioning.conftest import ok_json, run_fleet
from tests.integration.provisioning.fake_control_plane import FakeControlPlane

ONLY_EVENTS = WatchSettings(poll_interval_s=3600, safety_refresh_s=3600, min_interval_s=0)
ONLY_POLLING = WatchSettings(poll_interval_s=0.05, safety_refresh_s=3600, min_interval_s=0)


@pytest.fixture
def rollout(fleet_dir: FleetDir, control_plane: FakeControlPlane) -> str:
    """ro-1: tiny@1.0 to three devices, a canary of one (jet-1) then the rest."""
    for device in ("kiosk-1", "kiosk-2", "jet-1"):
        control_plane.add_device(device)
    root = fleet_dir.paths.root
    ok_json(
        run_fleet(
            "models",
            "push",
            TINY_GGUF,
            "--name",
            "tiny",
            "--version",
            "1.0",
            "--fleet-dir",
            root,
            "--json",
        )
    )
    created = ok_json(
        run_fleet(
            "rollouts",
            "create",
            "--model",
            "tiny@1.0",
            "--all",
            "--canary",
            "1",
            "--fleet-dir",
            root,
            "--json",
        )
    )
    return str(created["id"])


def complete(fake: FakeControlPlane, rollout_id: str) -> None:
    """The canary succeeds, wave 2 has a failure within threshold, and the rollout completes."""
    fake.set_device_state(rollout_id, "jet-1", "downloading")
    fake.set_device_state(rollout_id, "jet-1", "succeeded")
    fake.set_rollout_state(rollout_id, "running", wave_verdicts=["passed", "running"])
    fake.set_device_state(rollout_id, "kiosk-1", "succeeded")
    fake.set_device_state(rollout_id, "kiosk-2", "failed", "health check: 0.4 tokens/s < 1.5")
    fake.set_rollout_state(rollout_id, "completed", wave_verdicts=["passed", "passed"])


def abort(fake: FakeControlPlane, rollout_id: str) -> None:
    fake.set_device_state(rollout_id, "jet-1", "failed", "activation failed: out of memory")
    fake.set_rollout_state(rollout_id, "aborted", wave_verdicts=["failed"], reason="operator")


def halt(fake: FakeControlPlane, rollout_id: str) -> None:
    fake.set_device_state(rollout_id, "jet-1", "timed_out", "silent for 1800 s")
    fake.set_rollout_state(rollout_id, "halted", wave_verdicts=["failed"])


def in_background(action: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def after_first_read(
    fake: FakeControlPlane, action: Callable[[FakeControlPlane, str], None], rollout_id: str
) -> None:
    fake.wait_for_request("GET", f"/api/v1/rollouts/{rollout_id}")
    action(fake, rollout_id)


def after_subscription(
    fake: FakeControlPlane, action: Callable[[FakeControlPlane, str], None], rollout_id: str
) -> None:
    assert fake.subscribed.wait(10)
    action(fake, rollout_id)


class Recorder:
    def __init__(self) -> None:
        self.snapshots: list[dict[str, Any]] = []
        self.modes: list[FeedMode] = []

    def __call__(self, snapshot: dict[str, Any], mode: FeedMode) -> None:
        self.snapshots.append(snapshot)
        self.modes.append(mode)


async def watch(
    fake: FakeControlPlane, rollout_id: str, settings: WatchSettings, recorder: Recorder
) -> dict[str, Any]:
    token = (fake.control_dir.parent / "operator-token").read_text().strip()
    async with ControlClient(fake.url, token) as client:
        watcher = RolloutWatcher(client, rollout_id, recorder, settings)
        return await asyncio.wait_for(
            watcher.run(lambda s: s["state"] in ("completed", "aborted", "failed")), 60
        )


class TestRolloutWatcher:
    async def test_the_event_stream_alone_brings_it_to_the_end(self, control_plane, rollout):
        """With polling an hour apart, events alone carry the watcher to the completed state."""
        recorder = Recorder()

        def drive() -> None:
            assert control_plane.subscribed.wait(10)
            complete(control_plane, rollout)

        in_background(drive)
        final = await watch(control_plane, rollout, ONLY_EVENTS, recorder)
        assert final["state"] == "completed"
        assert FeedMode.STREAM in recorder.modes
        assert FeedMode.POLLING not in recorder.modes
        kiosk_2 = next(d for d in final["devices"] if d["id"] == "kiosk-2")
        assert kiosk_2["reason"] == "health check: 0.4 tokens/s < 1.5"

    async def test_a_refused_stream_falls_back_to_polling(self, control_plane, rollout):
        """If the event stream cannot be opened, polling brings the watcher to the end."""
        control_plane.refuse_event_stream = True
        recorder = Recorder()
        in_background(lambda: after_first_read(control_plane, abort, rollout))
        final = await watch(control_plane, rollout, ONLY_POLLING, recorder)
        assert final["state"] == "aborted"
        assert recorder.modes[-1] is FeedMode.POLLING
        assert control_plane.count("GET", "/api/v1/events") >= 1

    async def test_a_stream_that_drops_falls_back_to_polling(self, control_plane, rollout):
        """A stream that drops mid-rollout gives way to polling, which sees the rest."""
        recorder = Recorder()
        settings = WatchSettings(poll_interval_s=0.05, safety_refresh_s=3600, min_interval_s=0)

        def drive() -> None:
            assert control_plane.subscribed.wait(10)
            control_plane.drop_event_streams()
            complete(control_plane, rollout)

        in_background(drive)
        final = await watch(control_plane, rollout, settings, recorder)
        assert final["state"] == "completed"
        assert recorder.modes[-1] is FeedMode.POLLING

    async def test_a_rollout_already_ended_returns_at_once(self, control_plane, rollout):
        """A rollout that already ended is shown once and returned, without a stream."""
        control_plane.set_rollout_state(rollout, "aborted")
        recorder = Recorder()
        final = await watch(control_plane, rollout, ONLY_EVENTS, recorder)
        assert final["state"] == "aborted"
        assert len(recorder.snapshots) == 1
        assert control_plane.count("GET", "/api/v1/events") == 0


class TestWatchCommand:
    def watch_cli(self, fleet_dir: FleetDir, rollout_id: str, *extra: str) -> Any:
        return run_fleet(
            "rollouts", "watch", rollout_id, "--poll-interval", "0.05",
            "--fleet-dir", fleet_dir.paths.root, *extra,
        )  # fmt: skip

    def test_a_completed_rollout_exits_0_with_its_history(self, fleet_dir, control_plane, rollout):
        """watch exits 0 on completion; piped, it prints each change with its reason."""
        thread = in_background(lambda: after_subscription(control_plane, complete, rollout))
        result = self.watch_cli(fleet_dir, rollout)
        thread.join(10)
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("rollout ro-1 of tiny@1.0: running")
        assert "kiosk-2: waiting -> failed: health check: 0.4 tokens/s < 1.5" in lines
        assert lines[-1] == "rollout ro-1: running -> completed"

    def test_an_aborted_rollout_exits_3(self, fleet_dir, control_plane, rollout):
        """watch exits 3 when the rollout ends aborted."""
        control_plane.refuse_event_stream = True
        thread = in_background(lambda: after_first_read(control_plane, abort, rollout))
        result = self.watch_cli(fleet_dir, rollout)
        thread.join(10)
        assert result.exit_code == 3, result.stderr
        assert "jet-1: pending -> failed: activation failed: out of memory" in result.stdout

    def test_a_halted_rollout_exits_4_with_exit_on_halt(self, fleet_dir, control_plane, rollout):
        """With --exit-on-halt, a rollout halted by a failed wave ends the watch with 4."""
        control_plane.refuse_event_stream = True
        thread = in_background(lambda: after_first_read(control_plane, halt, rollout))
        result = self.watch_cli(fleet_dir, rollout, "--exit-on-halt")
        thread.join(10)
        assert result.exit_code == 4, result.stderr

    def test_json_prints_one_line_per_new_state(self, fleet_dir, control_plane, rollout):
        """--json prints each new snapshot as one JSON line; the last is the final state."""
        control_plane.refuse_event_stream = True
        thread = in_background(lambda: after_first_read(control_plane, abort, rollout))
        result = self.watch_cli(fleet_dir, rollout, "--json")
        thread.join(10)
        assert result.exit_code == 3
        snapshots = [json.loads(line) for line in result.stdout.splitlines()]
        assert snapshots[0]["state"] == "running"
        assert snapshots[-1]["state"] == "aborted"
        assert all(a != b for a, b in itertools.pairwise(snapshots))

    def test_an_unknown_rollout_is_not_found(self, fleet_dir, control_plane):
        """Watching a rollout that does not exist fails at once with the server's code."""
        result = self.watch_cli(fleet_dir, "ro-404", "--json")
        assert result.exit_code == 1
        assert '"reference": "not_found"' in result.stdout
