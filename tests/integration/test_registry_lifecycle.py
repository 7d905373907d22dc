"""Registry lifecycle against a real agent: kill -9 mid-change, failed activations, the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from edgelm_agent.registry.registry import Registry, RegistryConfig
from edgelm_protocol.repository.writer import RepositoryWriter
from tests.agent_process import TINY_GGUF, TINY_ONNX, AgentProcess

CRASH_POINTS = [
    "import.blob_stored",
    "import.published",
    "install.before_commit",
    "activation.verified",
    "activation.loaded",
    "activation.before_switch",
    "activation.after_commit",
]


def edgelm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgelm_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def publish_tiny(writer: RepositoryWriter, name: str, **edgelm: object) -> None:
    """Sign the tiny GGUF into a repository as NAME@1.0, with custom fields overridden."""
    custom = {
        "edgelm": {
            "name": name,
            "version": "1.0",
            "format": "gguf",
            "backend": "llama.cpp",
            "context_length": 512,
            "chat_template": None,
            "quantization": "F32",
            "min_ram_bytes": 1,
            "sampling": {},
            "health_check": {},
            **edgelm,
        }
    }
    writer.add_target(f"models/{name}/1.0/model.gguf", TINY_GGUF, custom, link=False)


async def served_model(agent: AgentProcess) -> tuple[str, str]:
    """The id the agent serves, and one completion from it (proof that it answers)."""
    async with agent.unix_session() as s:
        async with s.get("http://localhost/v1/models") as r:
            [model] = (await r.json())["data"]
        async with s.post(
            "http://localhost/v1/completions",
            json={"model": model["id"], "prompt": "hello", "max_tokens": 3},
        ) as r:
            assert r.status == 200, await r.text()
            return model["id"], (await r.json())["choices"][0]["text"]


class TestKillDuringChange:
    @pytest.mark.parametrize("point", CRASH_POINTS)
    async def test_restart_serves_a_verified_model(self, start_agent, short_tmp, point):
        """kill -9 at any step of importing and activating a new model: the agent restarts
        serving a verified model, the old one or the new one, never a half state."""
        first = start_agent(TINY_GGUF)  # model A becomes active
        assert first.stop() == 0
        crashing = AgentProcess(
            first.workdir, model=TINY_ONNX, env={"EDGELM_TEST_CRASH_POINT": point}
        )
        assert crashing.wait(60) == -signal.SIGKILL, crashing.logs()
        crashing.stop()
        assert any(e.get("point") == point for e in crashing.log_events("crash_point_reached"))

        again = AgentProcess(first.workdir, model=None).wait_ready()
        try:
            model_id, _ = await served_model(again)
        finally:
            again.stop()
        assert model_id in ("tiny-llama", "tiny-onnx")
        registry = Registry(RegistryConfig(root=first.workdir / "state" / "registry"))
        state = registry.state()
        assert state.active is not None
        assert state.active in state.models
        assert all(r.ok for r in registry.verify()), registry.verify()
        if point == "activation.after_commit":
            assert model_id == "tiny-onnx"  # committed before the crash: the new one
        else:
            assert model_id == "tiny-llama"  # not committed: the old one


class TestActivation:
    async def test_failed_health_check_rolls_back_and_keeps_serving(self, start_agent):
        """A model that misses its health-check budget is not switched to; the old one serves
        on, and the history says why."""
        first = start_agent(TINY_GGUF)
        assert first.stop() == 0
        root = first.workdir / "state" / "registry"
        writer = RepositoryWriter.open(root / "local-repo", root / "local-keys")
        publish_tiny(
            writer,
            "tiny-slow",
            health_check={"prompt": "hello", "max_tokens": 8, "min_tokens_per_s": "1e12"},
        )
        writer.publish()
        Registry(RegistryConfig(root=root, free_margin_bytes=0)).install("tiny-slow", "1.0")

        agent = AgentProcess(first.workdir, model=None).wait_ready()
        try:
            async with agent.unix_session() as s:
                async with s.post(
                    "http://localhost/v1/registry/activate", json={"model": "tiny-slow@1.0"}
                ) as r:
                    assert r.status == 422
                    error = (await r.json())["error"]
                assert error["code"] == "activation_failed"
                assert "tokens/s" in error["message"]
                async with s.get("http://localhost/v1/registry/models") as r:
                    view = await r.json()
            assert view["active"].startswith("tiny-llama@")
            assert view["history"][-1]["event"] == "activation_failed"
            assert "tokens/s" in view["history"][-1]["reason"]
            assert (await served_model(agent))[0] == "tiny-llama"
        finally:
            agent.stop()

    async def test_a_context_that_cannot_hold_the_health_check_fails_activation(self, start_agent):
        """The health check takes the serving path: a model whose context cannot hold the
        check's prompt and reply is not activated (it could not answer a client either)."""
        first = start_agent(TINY_GGUF)
        assert first.stop() == 0
        root = first.workdir / "state" / "registry"
        writer = RepositoryWriter.open(root / "local-repo", root / "local-keys")
        publish_tiny(
            writer,
            "tiny-cramped",
            context_length=128,
            health_check={"prompt": "hello", "max_tokens": 200},
        )
        writer.publish()
        Registry(RegistryConfig(root=root, free_margin_bytes=0)).install("tiny-cramped", "1.0")
        agent = AgentProcess(first.workdir, model=None).wait_ready()
        try:
            status, body = agent.request(
                "POST", "/v1/registry/activate", {"model": "tiny-cramped@1.0"}
            )
            assert status == 422
            assert body["error"]["code"] == "activation_failed"
            assert "exceeds the context length of 128" in body["error"]["message"]
            assert (await served_model(agent))[0] == "tiny-llama"
        finally:
            agent.stop()

    async def test_switch_keeps_running_requests_on_the_old_model(self, start_agent):
        """A stream that started on the old model finishes on it after the switch."""
        agent = start_agent(TINY_GGUF, extra_args=["--context-length", "16384"])
        async with agent.unix_session() as s:
            async with s.post(
                "http://localhost/v1/registry/import",
                json={"path": str(TINY_ONNX), "version": "1.0"},
            ) as r:
                assert r.status == 201
            stream = await s.post(
                "http://localhost/v1/completions",
                json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 3000, "stream": True},
            )
            await stream.content.readline()
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=str(agent.socket))
                ) as other,
                other.post(
                    "http://localhost/v1/registry/activate", json={"model": "tiny-onnx@1.0"}
                ) as r,
            ):
                assert r.status == 200
            done = False
            async for line in stream.content:
                done = done or line.startswith(b"data: [DONE]")
            assert done  # the old model finished the stream it had started
            async with s.get("http://localhost/v1/models") as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["tiny-onnx"]


class TestModelsCli:
    def test_direct_mode_on_a_stopped_agent(self, start_agent):
        """With --state-dir the models commands work on a stopped agent's registry."""
        agent = start_agent(TINY_GGUF)
        state_dir = str(agent.workdir / "state")
        busy = edgelm("models", "list", "--state-dir", state_dir)
        assert busy.returncode == 1
        assert "in use by a running agent" in busy.stderr
        assert agent.stop() == 0
        listed = edgelm("models", "list", "--state-dir", state_dir, "--json")
        assert listed.returncode == 0, listed.stderr
        view = json.loads(listed.stdout)
        assert view["active"].startswith("tiny-llama@")
        verified = edgelm("models", "verify", "--state-dir", state_dir, "--json")
        assert verified.returncode == 0
        assert json.loads(verified.stdout)["ok"] is True

    def test_verify_reports_a_corrupted_blob(self, start_agent):
        """A flipped byte in a stored blob makes verify fail and name the model."""
        agent = start_agent(TINY_GGUF)
        assert agent.stop() == 0
        root = agent.workdir / "state" / "registry"
        [blob] = list((root / "blobs" / "sha256").iterdir())
        blob.chmod(0o644)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        result = edgelm("models", "verify", "--state-dir", str(agent.workdir / "state"), "--json")
        assert result.returncode == 1
        [entry] = json.loads(result.stdout)["results"]
        assert entry["ok"] is False
        assert "corrupted" in entry["error"]

    def test_agent_refuses_a_corrupted_active_model(self, start_agent):
        """An active model whose blob changed on disk is never loaded: no model is served."""
        agent = start_agent(TINY_GGUF)
        assert agent.stop() == 0
        [blob] = list((agent.workdir / "state" / "registry" / "blobs" / "sha256").iterdir())
        blob.chmod(0o644)
        blob.write_bytes(blob.read_bytes()[:1000])  # truncated
        again = AgentProcess(agent.workdir, model=None)
        try:
            deadline = time.monotonic() + 120
            while not again.log_events("model_start_failed"):
                assert again.proc.poll() is None, again.logs()  # it keeps running, unready
                assert time.monotonic() < deadline, again.logs()
                time.sleep(0.1)
            assert not again.is_ready()
        finally:
            again.stop()


class TestSignedMetadataApplies:
    async def test_signed_chat_template_and_memory_budget(self, start_agent):
        """A signed chat-template override is what chat uses; a model needing more memory than
        the device has is refused before it is loaded, and the old one keeps serving."""
        first = start_agent(TINY_GGUF)
        assert first.stop() == 0
        root = first.workdir / "state" / "registry"
        writer = RepositoryWriter.open(root / "local-repo", root / "local-keys")

        # A template that ignores the conversation and always ends the prompt with "good",
        # which this model always answers with " bye".
        publish_tiny(writer, "tiny-templated", chat_template="{{ bos_token }}good")
        publish_tiny(writer, "tiny-huge", min_ram_bytes=1 << 60)
        writer.publish()
        registry = Registry(RegistryConfig(root=root, free_margin_bytes=0))
        registry.install("tiny-templated", "1.0")
        registry.install("tiny-huge", "1.0")

        agent = AgentProcess(first.workdir, model=None).wait_ready()
        try:
            async with agent.unix_session() as s:
                async with s.post(
                    "http://localhost/v1/registry/activate", json={"model": "tiny-huge@1.0"}
                ) as r:
                    assert r.status == 422
                    assert "bytes of memory" in (await r.json())["error"]["message"]
                async with s.post(
                    "http://localhost/v1/registry/activate", json={"model": "tiny-templated@1.0"}
                ) as r:
                    assert r.status == 200
                async with s.post(
                    "http://localhost/v1/chat/completions",
                    json={
                        "model": "tiny-templated",
                        "temperature": 0,
                        "max_tokens": 5,
                        "messages": [{"role": "user", "content": "hello"}],
                    },
                ) as r:
                    reply = await r.json()
            assert reply["choices"][0]["message"]["content"] == " bye"
        finally:
            agent.stop()
