"""The whole fleet, every part real: `edgelm provision`, `edgelm control run`, a Mosquitto,
enrolled agents as subprocesses on the tiny GGUF, and `edgelm fleet` driving rollouts.

These are the faults an operator meets: a broker that goes away mid-rollout, a control plane
restarted mid-rollout, a device offline for the whole rollout, a canary that fails its health
check, an abort after devices switched, a device that joins late, a remote job on every device.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import REPO, TINY_GGUF, AgentProcess, free_port
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.timeout(600)

FINAL_ROLLOUT = {"completed", "aborted", "failed"}


class FullFleet:
    """A fleet directory, a control plane and agents, driven through the real CLIs."""

    def __init__(self, root: Path, broker: Mosquitto) -> None:
        self.root = root
        self.broker = broker
        self.dir = root / "fleet"
        self.control_port = free_port()
        self.control_url = f"http://127.0.0.1:{self.control_port}"
        self.agents: dict[str, AgentProcess] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
        self.env |= {
            "EDGELM_CONTROL_ENGINE_TICK_S": "0.2",
            "EDGELM_CONTROL_INGEST_FLUSH_INTERVAL_S": "0.02",
        }
        self.run_cli(
            "provision", "fleet-init", str(self.dir), "--fleet", "acme",
            "--control-url", self.control_url,
            "--broker-url", f"mqtt://127.0.0.1:{broker.port}",
        )  # fmt: skip
        self.control: subprocess.Popen[bytes] | None = None
        self.start_control()

    # --- processes ---

    def run_cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "edgelm_cli", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"edgelm {' '.join(args)}:\n{result.stderr}{result.stdout}"
        return result.stdout

    def fleet(self, *args: str) -> Any:
        out = self.run_cli("fleet", *args, "--fleet-dir", str(self.dir), "--json")
        return json.loads(out) if out.strip() else None

    def start_control(self) -> None:
        log = open(self.root / "control.log", "ab")  # noqa: SIM115  # closed with the process
        config = self.dir / "control" / "control.toml"
        self.control = subprocess.Popen(
            [sys.executable, "-m", "edgelm_cli", "control", "run", "--config", str(config)],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=log,
        )
        self.wait_for(self._control_ready, "the control plane", timeout_s=120)

    def _control_ready(self) -> bool:
        assert self.control is not None
        assert self.control.poll() is None, self.control_log()
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.control_url}/readyz", timeout=2) as r:  # noqa: S310
                return bool(r.status == 200)
        except OSError:
            return False

    def stop_control(self, sig: int = signal.SIGTERM) -> None:
        if self.control is not None and self.control.poll() is None:
            self.control.send_signal(sig)
            self.control.wait(timeout=60)

    def control_log(self) -> str:
        path = self.root / "control.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def add_device(self, device: str, *, labels: tuple[str, ...] = (), start: bool = True) -> Path:
        folder = self.root / device
        folder.mkdir()
        bundle = folder / "bundle.json"
        label_args = [a for label in labels for a in ("--label", label)]
        self.run_cli(
            "provision", "device", device, "--fleet-dir", str(self.dir), "--class", "x86",
            *label_args, "--out", str(bundle), "--json",
        )  # fmt: skip
        self.run_cli("agent", "enroll", str(bundle), "--state-dir", str(folder / "state"))
        if start:
            self.start_agent(device)
            if self.control is not None:
                # Selectors match the class and labels a device reports in its state.
                self.wait_for(
                    lambda: (self.record(device) or {}).get("hardware_class"),
                    f"{device} to report its state",
                )
        return folder

    def record(self, device: str) -> dict[str, Any] | None:
        listed = self.fleet("devices", "list")["data"]
        return next((d for d in listed if d["id"] == device), None)

    def presence(self, device: str) -> str | None:
        return (self.record(device) or {}).get("presence")

    def start_agent(self, device: str) -> AgentProcess:
        agent = AgentProcess(
            self.root / device, model=None, env={"EDGELM_TELEMETRY_INTERVAL_S": "2"}
        ).wait_alive()
        self.agents[device] = agent
        return agent

    def stop_all(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.stop_control()

    # --- what the operator does ---

    def push(self, name: str, version: str, source: Path = TINY_GGUF) -> None:
        self.run_cli(
            "fleet", "models", "push", str(source), "--name", name, "--version", version,
            "--fleet-dir", str(self.dir), "--json",
        )  # fmt: skip

    def rollout(
        self,
        model: str,
        *selector: str,
        waves: str = "1,rest",
        pause_between_waves: bool = False,
        **options: str,
    ) -> str:
        extra = [a for key, value in options.items() for a in (f"--{key.replace('_', '-')}", value)]
        if pause_between_waves:
            extra.append("--pause-between-waves")
        created = self.fleet(
            "rollouts", "create", "--model", model, *(selector or ("--all",)),
            "--waves", waves, *extra,
        )  # fmt: skip
        return str(created["id"])

    def show(self, rollout_id: str) -> dict[str, Any]:
        shown: dict[str, Any] = self.fleet("rollouts", "show", rollout_id)
        return shown

    def states(self, rollout_id: str) -> dict[str, str]:
        return {d["id"]: d["state"] for d in self.show(rollout_id)["devices"]}

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout_s: float = 240) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}\n{self.control_log()}"
            )
            time.sleep(0.3)

    def wait_rollout(self, rollout_id: str, state: str) -> dict[str, Any]:
        return self.wait_for(  # type: ignore[no-any-return]
            lambda: (shown := self.show(rollout_id))["state"] == state and shown,
            f"rollout {rollout_id} to be {state}",
        )

    def serves(self, device: str) -> str | None:
        status, body = self.agents[device].request("GET", "/v1/models")
        return body["data"][0]["id"] if status == 200 and body["data"] else None


@pytest.fixture
def full_fleet(short_tmp: Path, mosquitto_factory: Callable[..., Mosquitto]) -> Iterator[FullFleet]:
    broker = mosquitto_factory(persistence=True)
    fleet = FullFleet(short_tmp, broker)
    try:
        yield fleet
    finally:
        fleet.stop_all()


class TestRollouts:
    def test_two_waves_reach_every_device_and_a_remote_job_runs_on_all(self, full_fleet: FullFleet):
        """A canary then the rest: success is counted when each device runs the model; a
        remote job then returns a result from every device."""
        for device in ("kiosk-1", "kiosk-2", "kiosk-3"):
            full_fleet.add_device(device)
        full_fleet.push("tiny", "1.0")
        rollout = full_fleet.rollout("tiny@1.0")
        done = full_fleet.wait_rollout(rollout, "completed")
        assert {d["state"] for d in done["devices"]} == {"succeeded"}
        assert [w["verdict"] for w in done["waves"]] == ["passed", "passed"]
        assert all(full_fleet.serves(d) == "tiny" for d in full_fleet.agents)
        job = full_fleet.fleet(
            "jobs", "submit", "Say hi.", "--model", "tiny@1.0", "--all", "--max-tokens", "4"
        )

        def job_done() -> dict[str, Any] | None:
            shown = full_fleet.fleet("jobs", "show", job["id"])
            finished = all(d["state"] == "succeeded" for d in shown["devices"])
            return shown if finished else None

        finished = full_fleet.wait_for(job_done, "the remote job on every device")
        assert len(finished["devices"]) == 3
        assert all(d["result"] is not None for d in finished["devices"])

    def test_a_device_offline_for_the_whole_rollout_gets_the_model_when_it_returns(
        self, full_fleet: FullFleet
    ):
        """An offline device does not block the rollout: it stays pending, the rollout
        completes and lists it, and when it comes back it installs the model."""
        full_fleet.add_device("kiosk-1")
        full_fleet.add_device("kiosk-2")
        full_fleet.agents.pop("kiosk-2").stop()
        full_fleet.wait_for(lambda: full_fleet.presence("kiosk-2") == "offline", "kiosk-2 offline")
        full_fleet.push("tiny", "1.0")
        rollout = full_fleet.rollout("tiny@1.0", waves="1,rest")
        done = full_fleet.wait_rollout(rollout, "completed")
        states = {d["id"]: d["state"] for d in done["devices"]}
        assert states["kiosk-1"] == "succeeded"
        assert states["kiosk-2"] == "pending"
        full_fleet.start_agent("kiosk-2")
        full_fleet.wait_for(
            lambda: full_fleet.states(rollout)["kiosk-2"] == "succeeded", "kiosk-2 to catch up"
        )
        assert full_fleet.serves("kiosk-2") == "tiny"

    def test_a_late_joiner_gets_the_model_of_a_finished_rollout(self, full_fleet: FullFleet):
        """A device enrolled after a rollout ended, and matching its selection, gets it."""
        full_fleet.add_device("kiosk-1", labels=("site=berlin",))
        full_fleet.push("tiny", "1.0")
        rollout = full_fleet.rollout("tiny@1.0", "--label", "site=berlin", waves="1")
        full_fleet.wait_rollout(rollout, "completed")
        full_fleet.add_device("kiosk-9", labels=("site=berlin",))
        full_fleet.wait_for(lambda: full_fleet.serves("kiosk-9") == "tiny", "the late joiner")


class TestFaults:
    def test_a_failing_canary_halts_the_rollout_and_the_device_keeps_its_model(
        self, full_fleet: FullFleet, short_tmp: Path
    ):
        """A model that cannot load fails the canary's activation: the device rolls back by
        itself (keeps serving v1) and says why, and the rollout halts before wave two."""
        for device in ("kiosk-1", "kiosk-2"):
            full_fleet.add_device(device)
        full_fleet.push("tiny", "1.0")
        full_fleet.wait_rollout(full_fleet.rollout("tiny@1.0", waves="2"), "completed")
        broken = short_tmp / "broken.gguf"
        broken.write_bytes(b"GGUF" + os.urandom(4096))
        full_fleet.push("tiny", "2.0", broken)
        rollout = full_fleet.rollout("tiny@2.0", waves="1,rest", on_failure="pause")
        halted = full_fleet.wait_rollout(rollout, "halted")
        states = {d["id"]: d for d in halted["devices"]}
        canary = next(d for d in halted["devices"] if d["wave"] == 0)
        assert canary["state"] == "failed"
        assert canary["reason"]
        other = next(d for d in states.values() if d["wave"] == 1)
        assert other["state"] == "waiting"
        assert full_fleet.serves(canary["id"]) == "tiny"  # v1, still
        _status, registry = full_fleet.agents[canary["id"]].request("GET", "/v1/registry/models")
        assert registry["active"] == "tiny@1.0"

    def test_abort_rolls_switched_devices_back_and_cancels_the_rest(self, full_fleet: FullFleet):
        """Abort after the canary switched: the canary goes back to the model it ran before
        (through a newer signed desired state), the devices that had not started are
        cancelled, and nobody runs the aborted model."""
        for device in ("kiosk-1", "kiosk-2"):
            full_fleet.add_device(device)
        full_fleet.push("tiny", "1.0")
        full_fleet.wait_rollout(full_fleet.rollout("tiny@1.0", waves="2"), "completed")
        full_fleet.push("tiny", "2.0")
        rollout = full_fleet.rollout("tiny@2.0", waves="1,rest", pause_between_waves=True)
        held = full_fleet.wait_rollout(rollout, "paused")  # the canary switched; kiosk-2 waits
        assert full_fleet.states(rollout) == {"kiosk-1": "succeeded", "kiosk-2": "waiting"}
        assert held["waves"][0]["verdict"] == "passed"
        assert full_fleet.serves("kiosk-1") == "tiny"
        full_fleet.fleet("rollouts", "abort", rollout)
        final = full_fleet.wait_for(
            lambda: (
                full_fleet.states(rollout) == {"kiosk-1": "rolled_back", "kiosk-2": "cancelled"}
            ),
            "the rollback",
        )
        assert final
        for device in full_fleet.agents:
            _status, registry = full_fleet.agents[device].request("GET", "/v1/registry/models")
            assert registry["active"] == "tiny@1.0", device

    def test_aborting_a_first_rollout_leaves_devices_as_they_were(self, full_fleet: FullFleet):
        """The fleet's first model, aborted after the canary switched: the canary is released
        and serves no model again (as before the rollout), the other device never gets it,
        and no row is left waiting for a rollback that cannot come."""
        for device in ("kiosk-1", "kiosk-2"):
            full_fleet.add_device(device)
        full_fleet.push("tiny", "1.0")
        rollout = full_fleet.rollout("tiny@1.0", waves="1,rest", pause_between_waves=True)
        full_fleet.wait_rollout(rollout, "paused")
        canary = _canary(full_fleet, rollout)
        other = next(d for d in full_fleet.agents if d != canary)
        assert full_fleet.serves(canary) == "tiny"
        full_fleet.fleet("rollouts", "abort", rollout)
        full_fleet.wait_for(
            lambda: full_fleet.states(rollout) == {canary: "rolled_back", other: "cancelled"},
            "the release",
        )
        assert full_fleet.show(rollout)["state"] == "aborted"
        for device in full_fleet.agents:
            assert full_fleet.serves(device) is None, device
            _status, registry = full_fleet.agents[device].request("GET", "/v1/registry/models")
            assert registry["active"] is None, device

    def test_the_control_plane_restarted_mid_rollout_loses_nothing(self, full_fleet: FullFleet):
        """kill -9 of the control plane between waves: restarted, it carries on from its
        store, the first wave is not run again, and the rollout completes."""
        for device in ("kiosk-1", "kiosk-2", "kiosk-3"):
            full_fleet.add_device(device)
        full_fleet.push("tiny", "1.0")
        rollout = full_fleet.rollout("tiny@1.0", waves="1,rest", pause_between_waves=True)
        full_fleet.wait_rollout(rollout, "paused")  # the canary passed, wave two waits
        canary = _canary(full_fleet, rollout)
        before = full_fleet.fleet("devices", "show", canary)["recent_events"]
        full_fleet.stop_control(signal.SIGKILL)
        full_fleet.start_control()
        full_fleet.fleet("rollouts", "resume", rollout)
        done = full_fleet.wait_rollout(rollout, "completed")
        assert {d["state"] for d in done["devices"]} == {"succeeded"}
        after = full_fleet.fleet("devices", "show", canary)["recent_events"]
        activations = [e for e in after if e["kind"] == "activated" and e["rollout"] == rollout]
        assert len(activations) == 1  # the canary was not sent through its wave again
        assert {e["id"] for e in before} <= {e["id"] for e in after}  # nothing stored was lost

    def test_the_broker_stopped_for_30_s_mid_rollout_loses_nothing(self, full_fleet: FullFleet):
        """With the broker down for 30 s between the waves, devices keep serving and
        queueing; when it is back, the rollout completes and every event arrives."""
        for device in ("kiosk-1", "kiosk-2"):
            full_fleet.add_device(device)
        full_fleet.push("tiny", "1.0")
        rollout = full_fleet.rollout("tiny@1.0", waves="1,rest", pause_between_waves=True)
        full_fleet.wait_rollout(rollout, "paused")  # the canary passed, wave two waits
        full_fleet.broker.stop()
        full_fleet.fleet("rollouts", "resume", rollout)
        time.sleep(30)  # the fault itself: the broker stays away this long
        canary = _canary(full_fleet, rollout)
        assert full_fleet.serves(canary) == "tiny"  # serving never waited for the network
        full_fleet.broker.start()
        # Whichever comes back first, the plane or kiosk-2, kiosk-2 ends up running the model;
        # the rollout may complete first and list it pending (an offline device never blocks).
        full_fleet.wait_for(
            lambda: set(full_fleet.states(rollout).values()) == {"succeeded"}, "every device"
        )
        assert full_fleet.wait_rollout(rollout, "completed")
        assert full_fleet.serves("kiosk-2") == "tiny"
        events = full_fleet.fleet("devices", "show", "kiosk-2")["recent_events"]
        kinds = [e["kind"] for e in events if e["rollout"] == rollout]
        for kind in ("desired_accepted", "download_started", "installed", "activated"):
            assert kind in kinds, kinds  # queued on the device, delivered after the outage
        assert kinds.count("activated") == 1  # resent until acknowledged, stored once
        assert len({e["id"] for e in events}) == len(events)


def _canary(fleet: FullFleet, rollout: str) -> str:
    return str(next(d["id"] for d in fleet.show(rollout)["devices"] if d["wave"] == 0))
