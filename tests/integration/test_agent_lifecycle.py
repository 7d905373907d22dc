"""The daemon's life: sockets, stale files, readiness, signals and startup failures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat

import aiohttp

from tests.agent_process import TINY_GGUF, AgentProcess


class TestUnixSocket:
    def test_socket_mode_is_0660(self, start_agent):
        """The API socket is created with mode 0660."""
        agent = start_agent()
        assert stat.S_IMODE(os.stat(agent.socket).st_mode) == 0o660
        assert stat.S_ISSOCK(os.stat(agent.socket).st_mode)

    def test_stale_socket_from_a_crash_is_replaced(self, start_agent):
        """A socket file left by a killed agent does not stop the next one from starting."""
        first = start_agent()
        first.proc.kill()  # SIGKILL: no cleanup, the socket file stays behind
        first.wait()
        assert first.socket.exists()
        second = AgentProcess(first.workdir, model=TINY_GGUF)  # same socket path
        try:
            second.wait_ready()
            assert stat.S_ISSOCK(os.stat(second.socket).st_mode)
        finally:
            second.stop()

    def test_live_socket_is_not_stolen(self, start_agent):
        """A second agent on the socket of a running one exits with a clear error."""
        first = start_agent()
        second = AgentProcess(
            first.workdir / "..", model=None, extra_args=["--socket", str(first.socket)]
        )
        try:
            assert second.wait() == 1
            assert "another process is serving" in second.logs()
        finally:
            second.stop()
        assert first.is_ready()

    def test_regular_file_in_the_way_is_refused(self, short_tmp):
        """A non-socket file at the socket path is never deleted; the agent refuses to start."""
        blocker = short_tmp / "agent.sock"
        blocker.write_text("precious")
        agent = AgentProcess(short_tmp, model=None)
        try:
            assert agent.wait() == 1
            assert "is not a socket" in agent.logs()
            assert blocker.read_text() == "precious"
        finally:
            agent.stop()


class TestStartup:
    def test_bad_model_path_exits_with_a_clear_error(self, start_agent, short_tmp):
        """A missing model file exits 1 with a message that names it, not a traceback."""
        agent = start_agent(short_tmp / "missing.gguf", ready=False)
        assert agent.wait() == 1
        logs = agent.logs()
        assert "missing.gguf does not exist" in logs
        assert "Traceback" not in logs

    def test_garbage_model_file_is_refused(self, start_agent, short_tmp):
        """A file that is neither GGUF nor ONNX is refused with its magic bytes named."""
        junk = short_tmp / "junk.gguf"
        junk.write_bytes(b"NOPE" + os.urandom(64))
        agent = start_agent(junk, ready=False)
        assert agent.wait() == 1
        assert "is not a GGUF file" in agent.logs()

    def test_truncated_gguf_is_refused(self, start_agent, short_tmp):
        """A GGUF cut short fails to load with an error, not a crash."""
        cut = short_tmp / "cut.gguf"
        cut.write_bytes(TINY_GGUF.read_bytes()[:20_000])
        agent = start_agent(cut, ready=False)
        assert agent.wait() == 1
        assert "could not load" in agent.logs()

    def test_without_a_model_healthz_is_ok_and_readyz_is_503(self, start_agent):
        """Alive but not ready: /healthz 200, /readyz 503 saying no model is active (not
        "loading", which would promise a model that is never coming)."""
        agent = start_agent(None, ready=False).wait_alive()
        assert agent.request("GET", "/healthz")[0] == 200

        async def check() -> None:
            async with agent.unix_session() as s:
                async with s.get("http://localhost/readyz") as r:
                    assert r.status == 503
                    body = await r.json()
                    assert body["status"] == "no_model"
                    assert "edgelm models import" in body["message"]
                async with s.post(
                    "http://localhost/v1/completions", json={"model": "x", "prompt": "hi"}
                ) as r:
                    assert r.status == 503
                    assert r.headers["Retry-After"]

        asyncio.run(check())

    def test_logs_are_json_lines_with_request_facts(self, start_agent):
        """Every request logs one JSON line with its id, model, tokens and durations."""
        agent = start_agent()

        async def call() -> None:
            async with (
                agent.unix_session() as s,
                s.post(
                    "http://localhost/v1/completions",
                    json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 5},
                    headers={"X-Request-Id": "abc-123"},
                ) as r,
            ):
                assert r.headers["X-Request-Id"] == "abc-123"
                await r.read()

        asyncio.run(call())
        agent.stop()
        for line in agent.logs().splitlines():
            json.loads(line)  # every line is JSON
        [record] = [
            e for e in agent.log_events("request_finished") if e.get("request_id") == "abc-123"
        ]
        assert record["model"] == "tiny-llama"
        assert record["completion_tokens"] == 5
        assert record["prompt_tokens"] > 0
        assert record["duration_ms"] > 0
        assert record["ttft_ms"] > 0


async def long_stream_then_sigterm(agent: AgentProcess) -> tuple[bool, str | None]:
    """Start a 16,000-token stream, send SIGTERM at its first event. Did [DONE] arrive, and
    what error event, if any, ended the stream?"""
    body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 16000, "stream": True}
    done, error = False, None
    async with (
        agent.unix_session() as s,
        s.post("http://localhost/v1/completions", json=body) as r,
    ):
        await r.content.readline()
        agent.signal(signal.SIGTERM)
        try:
            async for line in r.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif line.startswith(b'data: {"error"'):
                    error = json.loads(line[6:])["error"]["code"]
        except aiohttp.ClientPayloadError:
            pass  # the server cut the stream
    return done, error


class TestSignals:
    def test_sigterm_lets_a_running_stream_finish_then_exits_0(self, start_agent):
        """SIGTERM mid-stream: the stream completes within the grace period; exit code 0."""
        agent = start_agent(
            extra_args=["--context-length", "16384"], env={"EDGELM_SHUTDOWN_GRACE_S": "60"}
        )

        async def stream_and_signal() -> tuple[str, bool]:
            async with (
                agent.unix_session() as s,
                s.post(
                    "http://localhost/v1/completions",
                    json={
                        "model": "tiny-llama",
                        "prompt": "hello",
                        "max_tokens": 480,
                        "stream": True,
                    },
                ) as r,
            ):
                text, done = "", False
                signalled = False
                async for line in r.content:
                    if not signalled:
                        agent.signal(signal.SIGTERM)
                        signalled = True
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    elif line.startswith(b"data: "):
                        choice = json.loads(line[6:])["choices"][0]
                        text += choice["text"]
                        if choice["finish_reason"]:
                            assert choice["finish_reason"] == "length"
                return text, done

        text, done = asyncio.run(stream_and_signal())
        assert done
        assert text
        assert agent.wait() == 0
        assert not agent.socket.exists()
        events = [e["event"] for e in agent.log_events()]
        assert "agent_stopping" in events
        assert events[-1] == "agent_stopped"

    def test_sigterm_after_grace_stops_the_stream_with_an_error_and_exits_0(self, start_agent):
        """Past the grace period a stream ends with a not_ready error event (never [DONE],
        never a silent cut), and the agent still exits 0."""
        agent = start_agent(
            extra_args=["--context-length", "16384"], env={"EDGELM_SHUTDOWN_GRACE_S": "0.5"}
        )
        assert asyncio.run(long_stream_then_sigterm(agent)) == (False, "not_ready")
        assert agent.wait() == 0
        [stopped] = agent.log_events("requests_stopped")
        assert stopped["cancelled"] == 0  # it answered; nothing had to be cut

    def test_zero_grace_cancels_at_once(self, start_agent):
        """shutdown_grace_s = 0 means no grace at all, not 'wait forever'."""
        agent = start_agent(
            extra_args=["--context-length", "16384"], env={"EDGELM_SHUTDOWN_GRACE_S": "0"}
        )
        done, _ = asyncio.run(long_stream_then_sigterm(agent))
        assert not done
        assert agent.wait() == 0
        [stopped] = agent.log_events("generation_cancelled")
        assert stopped["completion_tokens"] < 16000

    def test_sigint_exits_0(self, start_agent):
        """Ctrl-C (SIGINT) is a clean shutdown too."""
        agent = start_agent()
        agent.signal(signal.SIGINT)
        assert agent.wait() == 0
        assert not agent.socket.exists()
        # and nothing listens on the HTTP port any more
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", agent.port)) != 0
