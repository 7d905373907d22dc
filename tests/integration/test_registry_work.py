"""Long registry work (hashing and copying a model) never outlives its reason to run.

A client that goes away cancels its import; SIGTERM stops an agent that is still importing its
``--model`` at start-up; and a registry thread that is stuck for good (a dead disk) delays the
shutdown by a bounded wait only. Each against a real agent, with sparse files of gigabytes that
cost no disk until they are copied.
"""

from __future__ import annotations

import http.client
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent_process import TINY_GGUF, AgentProcess

StartAgent = Callable[..., AgentProcess]

#: Large enough that hashing it takes seconds, so a test can act while it runs.
BIG_BYTES = 4 << 30


@pytest.fixture
def big_gguf(short_tmp: Path) -> Path:
    """A 4 GiB sparse file that starts like a GGUF model: hashing it takes seconds, and it
    holds no disk until copied."""
    if shutil.disk_usage(short_tmp).free < 4 * BIG_BYTES:
        pytest.skip("needs 16 GiB of free disk in /tmp to import a 4 GiB model")
    path = short_tmp / "big.gguf"
    with open(path, "wb") as f:
        f.write(b"GGUF")
        f.truncate(BIG_BYTES)
    return path


def wait_for_event(agent: AgentProcess, event: str, timeout_s: float = 60) -> dict[str, object]:
    """The first log line of ``event``; the deadline is only a safety net."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = agent.log_events(event)
        if found:
            return found[0]
        assert agent.proc.poll() is None, agent.logs()
        assert time.monotonic() < deadline, f"no {event} in the log:\n{agent.logs()}"
        time.sleep(0.05)


def import_and_give_up(agent: AgentProcess, path: Path, after_s: float) -> None:
    """POST an import and hang up after ``after_s`` without waiting for the answer."""
    try:
        status, body = agent.request(
            "POST", "/v1/registry/import", {"path": str(path)}, timeout_s=after_s
        )
    except (TimeoutError, http.client.HTTPException, OSError):
        return
    raise AssertionError(f"the import answered {status} before the client gave up: {body}")


class TestImportsStop:
    def test_a_client_that_goes_away_cancels_its_import(
        self, start_agent: StartAgent, big_gguf: Path
    ) -> None:
        """An import whose client hangs up stops at its next chunk: nothing is installed or
        left in staging, and the registry serves the next request once it has stopped."""
        agent = start_agent()
        import_and_give_up(agent, big_gguf, after_s=1.0)
        wait_for_event(agent, "registry_work_cancelled")
        status, _ = agent.request("POST", "/v1/registry/gc", {})  # waits for the registry
        assert status == 200
        status, listed = agent.request("GET", "/v1/registry/models")
        assert [m["name"] for m in listed["models"]] == ["tiny-llama"]
        assert list((agent.workdir / "state" / "registry" / "staging").iterdir()) == []

    def test_sigterm_during_the_start_up_import_exits_0(
        self, start_agent: StartAgent, big_gguf: Path
    ) -> None:
        """SIGTERM while ``--model`` is still being imported stops the agent at once and
        cleanly: exit 0, socket removed, without importing the rest."""
        agent = start_agent(big_gguf, ready=False)
        wait_for_event(agent, "model_importing")
        agent.signal(signal.SIGTERM)
        assert agent.wait(120) == 0, agent.logs()
        assert agent.log_events("agent_stopped")
        assert not agent.socket.exists()
        assert not agent.log_events("agent_ready")


class TestStuckRegistryThread:
    def test_shutdown_does_not_wait_for_a_thread_stuck_for_good(
        self, start_agent: StartAgent, short_tmp: Path
    ) -> None:
        """An import stuck in its thread for ever (a dead disk) does not hold the agent: on
        SIGTERM it waits a bounded time, says so, and exits 0."""
        agent = start_agent(
            None, ready=False, env={"EDGELM_TEST_CRASH_POINT": "hang:import.scanned"}
        ).wait_alive()
        model = short_tmp / "model.gguf"
        shutil.copy(TINY_GGUF, model)
        import_and_give_up(agent, model, after_s=2.0)
        wait_for_event(agent, "crash_point_reached")
        agent.signal(signal.SIGTERM)
        assert agent.wait(120) == 0, agent.logs()
        assert agent.log_events("registry_thread_stuck")
        assert not agent.socket.exists()
