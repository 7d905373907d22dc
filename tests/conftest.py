"""Shared fixtures: short temp dirs (Unix socket paths are limited to 107 bytes) and agents."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.agent_process import TINY_GGUF, TINY_ONNX, AgentProcess

# A real Mosquitto per test, on a free port (tests/mosquitto.py): every suite that needs a broker.
pytest_plugins = ("tests.mosquitto",)

# Hypothesis fails an example that takes over 200 ms by default. Examples here commit to SQLite
# with fsync, and CI machines stall; a slow example is not a wrong one.
settings.register_profile("edgelm", deadline=None)
settings.load_profile("edgelm")

MODELS = {"gguf": TINY_GGUF, "onnx": TINY_ONNX}
MODEL_IDS = {"gguf": "tiny-llama", "onnx": "tiny-onnx"}


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="edgelm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_agent(short_tmp: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents for one test; every one is stopped at teardown."""
    started: list[AgentProcess] = []

    def start(
        model: Path | None = TINY_GGUF, *, ready: bool = True, **kwargs: object
    ) -> AgentProcess:
        workdir = short_tmp / f"a{len(started)}"
        workdir.mkdir()
        agent = AgentProcess(workdir, model=model, **kwargs)  # type: ignore[arg-type]
        started.append(agent)
        return agent.wait_ready() if ready else agent

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture(scope="module", params=["gguf", "onnx"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[AgentProcess, str]]:
    """One agent per backend, shared by a module's tests: (agent, model id)."""
    workdir = Path(tempfile.mkdtemp(prefix="edgelm-", dir="/tmp"))
    agent = AgentProcess(workdir, model=MODELS[request.param]).wait_ready()
    yield agent, MODEL_IDS[request.param]
    agent.stop()
    shutil.rmtree(workdir, ignore_errors=True)
