"""Several models in memory under a RAM budget, against real agents and the ``openai`` client.

Each agent serves tiny-llama as its active model and has tiny-phi3 (and, where a third model
is needed, tiny-llama again under another name, as a second quantization would be) installed
beside it. The budgets are set from the same estimate the agent makes, so that they fit two
models, or one and a bit, exactly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from edgelm_agent.inference.gguf_shape import read_shape
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.model_manager import ModelManager
from edgelm_agent.registry.registry import Registry, RegistryConfig
from edgelm_agent.residency import RUNTIME_OVERHEAD_BYTES, UNKNOWN_SHAPE_FACTOR, estimate_bytes
from edgelm_agent.serving import ModelHost
from tests.agent_process import FIXTURES, TINY_GGUF, TINY_ONNX, AgentProcess

pytestmark = pytest.mark.llama

TINY_PHI3 = FIXTURES / "tiny-phi3.gguf"
CONTEXT = 4096  # the agent's default context_length; both tiny models were trained longer
DEADLINE_S = 60.0


def estimate(path: Path) -> int:
    """The bytes the agent counts for a model file it imported (see docs/operator-guide.md)."""
    return estimate_bytes(
        file_bytes=path.stat().st_size, context_length=CONTEXT, shape=read_shape(path)
    )


LLAMA, PHI = estimate(TINY_GGUF), estimate(TINY_PHI3)


def start(workdir: Path, **settings: str) -> AgentProcess:
    env = {f"EDGELM_{k.upper()}": v for k, v in settings.items()}
    agent = AgentProcess(workdir, model=TINY_GGUF, env=env).wait_ready()
    try:
        for name, path in (("phi", TINY_PHI3), ("llama-b", TINY_GGUF)):
            status, body = agent.request(
                "POST", "/v1/registry/import", {"path": str(path), "name": name}
            )
            assert status == 201, body
    except BaseException:
        agent.stop()
        raise
    return agent


@pytest.fixture
def agent_with(request: pytest.FixtureRequest) -> Iterator[Callable[..., AgentProcess]]:
    """Start agents with settings; each is stopped and its directory removed afterwards."""
    started: list[AgentProcess] = []
    workdirs: list[Path] = []

    def make(**settings: str) -> AgentProcess:
        workdirs.append(Path(tempfile.mkdtemp(prefix="edgelm-", dir="/tmp")))
        started.append(start(workdirs[-1], **settings))  # a start that fails stops its agent
        return started[-1]

    yield make
    for agent in started:
        agent.stop()
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)


def client(agent: AgentProcess) -> OpenAI:
    return OpenAI(base_url=agent.base_url + "/v1", api_key="unused", max_retries=0)


def chat(agent: AgentProcess, model: str, **extra: Any) -> str:
    """One short chat with ``model``; the model that answered, as the response says."""
    response = client(agent).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        extra_body=extra or None,
    )
    assert response.choices[0].finish_reason in ("stop", "length")
    return response.model


def listed(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """``/v1/models`` by id."""
    status, body = agent.request("GET", "/v1/models")
    assert status == 200
    return {card["id"]: card for card in body["data"]}


def loaded(agent: AgentProcess) -> set[str]:
    return {model_id for model_id, card in listed(agent).items() if card["loaded"]}


def eventually(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until it holds; the deadline only bounds a broken agent."""
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.1)


def metric(agent: AgentProcess, line_start: str) -> float:
    """The value of the first /metrics line that starts with ``line_start`` (0 if none)."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        text = response.read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def mapped_copies(agent: AgentProcess, model_file: Path) -> int:
    """How many times the agent has the blob of ``model_file`` mapped: llama.cpp maps a GGUF
    file once per loaded copy, and unmaps it when the copy is closed."""
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    with open(f"/proc/{agent.proc.pid}/maps", encoding="utf-8") as maps:
        return sum(1 for line in maps if line.rstrip().endswith(f"/blobs/sha256/{digest}"))


def start_request(
    agent: AgentProcess, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> socket.socket:
    """Send a POST over the Unix socket and leave its answer unread: the request runs until
    the agent finishes it or the socket is closed (a client hanging up)."""
    payload = json.dumps(body).encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(agent.socket))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (``T``: stopped by a signal)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(agent: AgentProcess) -> None:
    """Wait until the agent has stopped itself with SIGSTOP at its ``stop:`` crash point."""
    eventually(lambda: process_state(agent.proc.pid) == "T", "the agent stopped at its point")


def loads_of(agent: AgentProcess, model: str) -> int:
    """How many times the agent began to load ``model`` (its model_loading lines)."""
    return sum(1 for e in agent.log_events("model_loading") if e["model"].split("@")[0] == model)


class TestTwoModelsInMemory:
    def test_both_models_serve_alternating_requests(self, agent_with):
        """With room for both, requests alternate between the active model and another
        installed one, which the first request loads; /v1/models marks what is loaded."""
        agent = agent_with(ram_budget_bytes=str(LLAMA + PHI + LLAMA))
        cards = listed(agent)
        assert cards["tiny-llama"]["loaded"]
        assert cards["tiny-llama"]["active"]
        assert cards["phi"] == {**cards["phi"], "loaded": False, "active": False}
        assert cards["phi"]["role"] == "generation"
        for _ in range(3):
            assert chat(agent, "phi") == "phi"
            assert chat(agent, "tiny-llama") == "tiny-llama"
        assert loaded(agent) == {"tiny-llama", "phi"}
        assert not listed(agent)["phi"]["active"]
        assert metric(agent, "edgelm_models_loaded ") == 2
        assert metric(agent, 'edgelm_model_loads_total{outcome="loaded"}') == 1


class TestLeastRecentlyUsed:
    def test_the_least_recently_used_model_makes_room(self, agent_with):
        """A budget for the active model and one more: the other model that was used least
        recently is unloaded, and a request for it waits for its load and succeeds."""
        agent = agent_with(ram_budget_bytes=str(LLAMA + max(PHI, LLAMA) + (1 << 20)))
        assert chat(agent, "phi") == "phi"
        assert loaded(agent) == {"tiny-llama", "phi"}
        assert chat(agent, "llama-b") == "llama-b"
        assert loaded(agent) == {"tiny-llama", "llama-b"}
        assert chat(agent, "phi") == "phi"
        assert loaded(agent) == {"tiny-llama", "phi"}
        assert chat(agent, "tiny-llama") == "tiny-llama"  # the active model never left
        events = [e for e in agent.log_events("model_unloaded") if e["reason"] == "lru"]
        assert [e["model"].split("@")[0] for e in events] == ["phi", "llama-b"]
        assert metric(agent, 'edgelm_model_unloads_total{reason="lru"}') == 2


class TestBudgetTooSmall:
    def test_a_model_that_cannot_fit_is_refused_and_the_others_serve(self, agent_with):
        """A budget with no room beside the active model: a request for another model gets
        503 insufficient_memory with the figures, and the active model keeps serving."""
        budget = LLAMA + PHI // 2
        agent = agent_with(ram_budget_bytes=str(budget))
        with pytest.raises(openai.APIStatusError) as caught:
            chat(agent, "phi")
        assert caught.value.status_code == 503
        error = caught.value.body
        assert isinstance(error, dict)
        assert error["code"] == "insufficient_memory"
        assert f"needs about {PHI} bytes" in error["message"]
        assert f"the budget is {budget} bytes" in error["message"]
        assert chat(agent, "tiny-llama") == "tiny-llama"
        assert loaded(agent) == {"tiny-llama"}
        assert agent.proc.poll() is None
        assert metric(agent, 'edgelm_model_loads_total{outcome="refused"}') == 1

    def test_without_a_budget_another_installed_model_is_not_served(self, agent_with):
        """The default budget (0) keeps today's behaviour: only the active model serves,
        and /v1/models lists only it."""
        agent = agent_with()
        with pytest.raises(openai.NotFoundError):
            chat(agent, "phi")
        assert set(listed(agent)) == {"tiny-llama"}


class TestUnloading:
    def test_keep_alive_0_unloads_after_the_request(self, agent_with):
        """A request with keep_alive 0 leaves its model unloaded once it has answered."""
        agent = agent_with(ram_budget_bytes=str(4 * LLAMA + PHI), idle_unload_s="never")
        assert chat(agent, "phi", keep_alive=0) == "phi"
        eventually(lambda: loaded(agent) == {"tiny-llama"}, "phi unloaded")
        [event] = agent.log_events("model_unloaded")
        assert event["reason"] == "keep_alive"

    def test_keep_alive_as_a_duration_keeps_the_model(self, agent_with):
        """keep_alive "5m" (Ollama's form) keeps the model loaded past a short idle time."""
        agent = agent_with(ram_budget_bytes=str(4 * LLAMA + PHI), idle_unload_s="0")
        assert chat(agent, "phi", keep_alive="5m") == "phi"
        assert chat(agent, "tiny-llama") == "tiny-llama"
        assert loaded(agent) == {"tiny-llama", "phi"}

    def test_a_bad_keep_alive_is_a_400(self, agent_with):
        """keep_alive that is not a duration is refused, naming the field."""
        agent = agent_with(ram_budget_bytes=str(4 * LLAMA + PHI))
        with pytest.raises(openai.BadRequestError) as caught:
            chat(agent, "phi", keep_alive="soon")
        assert caught.value.body["param"] == "keep_alive"  # type: ignore[index]

    def test_an_idle_model_is_unloaded_and_the_active_one_stays(self, agent_with):
        """With idle_unload_s set short, a model loaded on demand goes once unused; the
        active model never does."""
        agent = agent_with(ram_budget_bytes=str(4 * LLAMA + PHI), idle_unload_s="1")
        assert chat(agent, "phi") == "phi"
        eventually(lambda: loaded(agent) == {"tiny-llama"}, "phi unloaded when idle")
        [event] = agent.log_events("model_unloaded")
        assert event["reason"] == "idle"
        assert chat(agent, "tiny-llama") == "tiny-llama"
        assert chat(agent, "phi") == "phi"  # and it loads again on demand


class TestUnknownModels:
    def test_a_model_that_is_not_installed_is_still_404(self, agent_with):
        """With a budget, a request for a model that is not installed is a 404."""
        agent = agent_with(ram_budget_bytes=str(4 * LLAMA + PHI))
        with pytest.raises(openai.NotFoundError) as caught:
            chat(agent, "no-such-model")
        assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
        assert loaded(agent) == {"tiny-llama"}


class TestActivatingAModelLoadedOnDemand:
    def test_the_activation_takes_over_the_copy_a_request_is_running_on(self, agent_with):
        """Activating a model loaded on demand while a long request runs on it switches to
        that very copy: it is not loaded a second time, and once the request has ended and
        the old model retired, one copy of it is in memory, not two, one outside the budget."""
        agent = agent_with(
            ram_budget_bytes=str(1 << 30), idle_unload_s="never", context_length="16384"
        )
        status, body = agent.request(
            "POST",
            "/v1/registry/import",
            {"path": str(TINY_GGUF), "name": "llama-long", "context_length": 16384},
        )
        assert status == 201, body
        long_request = start_request(
            agent,
            {
                "model": "llama-long",
                "messages": [{"role": "user", "content": "go on"}],
                "max_tokens": 16000,  # tens of seconds: it runs while the activation switches
                "keep_alive": -1,
            },
        )
        try:
            eventually(lambda: "llama-long" in loaded(agent), "llama-long loaded on demand")
            status, body = agent.request("POST", "/v1/registry/activate", {"model": "llama-long"})
            assert status == 200, body
            assert loads_of(agent, "llama-long") == 1
            assert listed(agent)["llama-long"]["active"]
            assert metric(agent, "edgelm_models_loaded ") == 1
        finally:
            long_request.close()  # the client hangs up: the request ends, its lease returns
        eventually(lambda: bool(agent.log_events("model_retired")), "tiny-llama retired")
        assert chat(agent, "llama-long") == "llama-long"
        assert loads_of(agent, "llama-long") == 1
        assert mapped_copies(agent, TINY_GGUF) == 1  # llama-long's blob is tiny-llama's too
        assert [e["model"] for e in agent.log_events("model_adopted")] == [
            agent.log_events("model_activated")[-1]["model"]
        ]
        [activated] = [
            h
            for h in agent.request("GET", "/v1/registry/models")[1]["history"]
            if h["event"] == "activated" and h["model"].startswith("llama-long@")
        ]
        assert activated["details"]["health"]["tokens_per_s"] > 0, activated


class TestClientHangsUpMidLoad:
    def test_the_load_finishes_and_the_model_is_kept_once(self):
        """A client that hangs up while its model loads does not leave a copy outside the
        budget: the load ends, the model is kept (and counted), and the next request for it
        runs on that copy without a second load."""
        workdir = Path(tempfile.mkdtemp(prefix="edgelm-", dir="/tmp"))
        env = {
            "EDGELM_RAM_BUDGET_BYTES": str(4 * LLAMA + PHI),
            "EDGELM_IDLE_UNLOAD_S": "never",
            # Every load stops the agent just before llama.cpp reads the file.
            "EDGELM_TEST_CRASH_POINT": "stop:activation.verified",
        }
        agent = AgentProcess(workdir, model=TINY_GGUF, env=env)
        try:
            wait_stopped(agent)  # the start-up activation of tiny-llama
            os.kill(agent.proc.pid, signal.SIGCONT)
            agent.wait_ready()
            status, body = agent.request(
                "POST", "/v1/registry/import", {"path": str(TINY_PHI3), "name": "phi"}
            )
            assert status == 201, body
            hanging_up = start_request(
                agent, {"model": "phi", "messages": [{"role": "user", "content": "hi"}]}
            )
            wait_stopped(agent)  # phi's load, right before llama.cpp reads the file
            hanging_up.close()
            os.kill(agent.proc.pid, signal.SIGCONT)
            eventually(lambda: "phi" in loaded(agent), "phi kept loaded")
            assert chat(agent, "phi") == "phi"
            assert loads_of(agent, "phi") == 1
            assert mapped_copies(agent, TINY_PHI3) == 1
            assert metric(agent, 'edgelm_model_loads_total{outcome="loaded"}') == 1
            assert metric(agent, 'edgelm_model_loads_total{outcome="failed"}') == 0
        finally:
            if agent.proc.poll() is None:
                os.kill(agent.proc.pid, signal.SIGCONT)  # a stopped agent cannot take SIGTERM
            agent.stop()
            shutil.rmtree(workdir, ignore_errors=True)

    async def test_a_cancelled_activation_closes_what_it_loaded(self, tmp_path):
        """An activation cancelled while llama.cpp loads its model (its client hung up)
        waits for the load and closes that copy, rather than drop it to hold its memory
        until a garbage collection finds it (its abort callback makes a cycle)."""
        loop = asyncio.get_running_loop()
        # One thread: a no-op queued after the load runs once the load has ended.
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        registry = Registry(RegistryConfig(root=tmp_path / "registry"))
        target = registry.import_model(TINY_PHI3, name="phi")
        blob = str(registry.blobs.blob_path(target.sha256))
        activations: list[asyncio.Future[Any]] = []

        def cancel_at(point: str) -> None:
            if point == "activation.verified":  # the next await is the load
                activations[0].cancel()

        manager = ModelManager(
            registry, ModelHost(), AgentMetrics(), threads=1, context_length=512,
            max_queue=1, retry_after_s=1, crash_point=cancel_at,
        )  # fmt: skip
        gc.disable()  # what is dropped stays mapped, as long as no collection runs
        try:
            activations.append(asyncio.ensure_future(manager.activate(target.ref)))
            with pytest.raises(asyncio.CancelledError):
                await activations[0]
            # Read in the one thread, so after the load there has ended.
            maps = await asyncio.to_thread(Path("/proc/self/maps").read_text, encoding="utf-8")
            assert not [line for line in maps.splitlines() if line.endswith(blob)]
            assert manager.host.active is None
        finally:
            gc.enable()
            await manager.close(registry_wait_s=5)


@pytest.mark.onnx
class TestOnnxSize:
    def test_an_onnx_model_counts_its_files_not_its_manifest(self, agent_with):
        """An ONNX folder is estimated from the bytes of its files (the signed target's
        length is that of its small manifest): a budget one byte short of that refuses it
        with 503 insufficient_memory and the figure, before anything loads."""
        files = sum(f.stat().st_size for f in TINY_ONNX.iterdir() if f.is_file())
        needed = files * UNKNOWN_SHAPE_FACTOR + RUNTIME_OVERHEAD_BYTES
        budget = LLAMA + needed - 1
        agent = agent_with(ram_budget_bytes=str(budget))
        status, body = agent.request(
            "POST", "/v1/registry/import", {"path": str(TINY_ONNX), "name": "onnx-b"}
        )
        assert status == 201, body
        with pytest.raises(openai.APIStatusError) as caught:
            client(agent).completions.create(model="onnx-b", prompt="hello", max_tokens=4)
        assert caught.value.status_code == 503
        error = caught.value.body
        assert isinstance(error, dict)
        assert error["code"] == "insufficient_memory"
        assert f"needs about {needed} bytes" in error["message"]
        assert loaded(agent) == {"tiny-llama"}
        assert chat(agent, "tiny-llama") == "tiny-llama"


class TestJobsOnModelsLoadedOnDemand:
    def job(self, agent: AgentProcess, model: str, **fields: Any) -> str:
        """Submit a short chat job for ``model``; its id."""
        request = {
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            **fields.pop("request", {}),
        }
        status, body = agent.request("POST", "/v1/jobs", {"request": request, **fields})
        assert status == 202, body
        return str(body["id"])

    def final(self, agent: AgentProcess, job_id: str) -> dict[str, Any]:
        """The job once it has ended."""
        shown: dict[str, Any] = {}

        def ended() -> bool:
            shown.update(agent.request("GET", f"/v1/jobs/{job_id}")[1])
            return shown["state"] not in ("queued", "running")

        eventually(ended, f"job {job_id} ended")
        return shown

    def test_a_job_loads_an_installed_model_and_holds_it_while_it_runs(self, agent_with):
        """With a budget, a job naming an installed model that is not in memory loads it, as
        a request would, and runs on it under a lease; its keep_alive then unloads it."""
        agent = agent_with(ram_budget_bytes=str(4 * LLAMA + PHI), idle_unload_s="never")
        job = self.final(agent, self.job(agent, "phi", request={"keep_alive": 0}, ttl_s=120))
        assert job["state"] == "succeeded", job
        assert job["result"]["model"] == "phi"
        eventually(lambda: loaded(agent) == {"tiny-llama"}, "phi unloaded after its job")
        [event] = agent.log_events("model_unloaded")
        assert event["reason"] == "keep_alive"

    def test_a_job_with_a_bad_keep_alive_is_refused_at_submission(self, agent_with):
        """keep_alive in a job's request is checked when the job is submitted: 400."""
        agent = agent_with(ram_budget_bytes=str(4 * LLAMA + PHI))
        request = {"model": "phi", "prompt": "hi", "keep_alive": "soon"}
        status, body = agent.request("POST", "/v1/jobs", {"request": request})
        assert status == 400, body
        assert body["error"]["param"] == "keep_alive"

    def test_without_a_budget_a_job_for_another_model_waits(self, agent_with):
        """Budget 0 keeps the queue as it was: a job for an installed model that is not the
        active one waits, even ahead of a job for the active model, which runs."""
        agent = agent_with()
        waiting = self.job(agent, "phi", priority=100)
        ran = self.final(agent, self.job(agent, "tiny-llama"))
        assert ran["state"] == "succeeded", ran
        assert agent.request("GET", f"/v1/jobs/{waiting}")[1]["state"] == "queued"
        assert loaded(agent) == {"tiny-llama"}
