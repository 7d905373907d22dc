"""Shutdown is clean whatever was going on: every request gets an answer, every service stops,
the socket file goes, the database closes, and the exit code is 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgelm_agent.config import AgentConfig
from edgelm_agent.daemon import Daemon
from edgelm_agent.jobs.worker import JobWorker
from tests.agent_process import AgentProcess


async def readyz(agent: AgentProcess, s: aiohttp.ClientSession) -> dict[str, Any]:
    async with s.get(agent.base_url + "/readyz") as r:
        return await r.json()  # type: ignore[no-any-return]


class TestQueuedRequestsAtTheEndOfTheGrace:
    async def test_waiting_requests_get_503_and_the_stream_an_error_event(self, start_agent):
        """When the grace ends, requests still waiting for the model get 503 with
        Retry-After and a JSON body (not 0 bytes), the running stream ends with an error
        event, and the agent exits 0 with its socket removed."""
        agent = start_agent(
            extra_args=["--max-queue", "4", "--context-length", "16384"],
            env={"EDGELM_SHUTDOWN_GRACE_S": "0.5"},
        )
        url = agent.base_url + "/v1/completions"
        short = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 4}
        async with aiohttp.ClientSession() as s:
            holder = await s.post(url, json={**short, "max_tokens": 16000, "stream": True})
            await holder.content.readline()  # the model is busy with this stream

            async def waiting() -> tuple[int, dict[str, str], Any]:
                async with s.post(url, json=short) as r:
                    return r.status, dict(r.headers), await r.json(content_type=None)

            queued = [asyncio.create_task(waiting()) for _ in range(2)]
            deadline = time.monotonic() + 60
            while (await readyz(agent, s)).get("queue_depth") != 2:
                assert time.monotonic() < deadline, "the requests never queued"
                await asyncio.sleep(0.01)
            agent.signal(signal.SIGTERM)
            answers = await asyncio.gather(*queued)
            stream_error = None
            async for line in holder.content:
                if line.startswith(b'data: {"error"'):
                    stream_error = json.loads(line[6:])["error"]["code"]
            holder.close()
        for status, headers, body in answers:
            assert status == 503
            assert headers["Retry-After"]
            assert body["error"]["code"] == "not_ready"
        assert stream_error == "not_ready"
        assert agent.wait() == 0
        assert not agent.socket.exists()


class TestFailingServiceAtShutdown:
    async def test_a_dead_service_is_reported_and_shutdown_stays_clean(
        self, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
    ):
        """A service that keeps failing makes /readyz say degraded (never silence), and
        stopping the agent still removes its socket and closes its database without raising."""

        async def broken(self: JobWorker) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(JobWorker, "run", broken)
        socket_path = short_tmp / "agent.sock"
        config = AgentConfig(state_dir=short_tmp / "state", socket_path=socket_path, http=None)
        umask = os.umask(0o022)  # the daemon sets its own; give the test process its back
        os.umask(umask)
        daemon = Daemon(config)
        running = asyncio.create_task(daemon.run())
        try:
            connector = aiohttp.UnixConnector(path=str(socket_path))
            async with aiohttp.ClientSession(connector=connector) as s:
                deadline = time.monotonic() + 60
                while True:
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with s.get("http://localhost/readyz") as r:
                            body = await r.json()
                            jobs = body.get("services", {}).get("jobs", {})
                            if jobs.get("restarts", 0) >= 1:
                                break
                    assert time.monotonic() < deadline, "the failing service was never reported"
                    await asyncio.sleep(0.05)
                assert r.status == 503
                assert jobs["healthy"] is False
                assert "disk is full" in jobs["last_error"]
                async with s.get("http://localhost/metrics") as r:
                    text = await r.text()
                assert 'edgelm_service_restarts_total{service="jobs"}' in text
        finally:
            daemon.request_stop()
            await asyncio.wait_for(running, 60)  # returns: nothing the service did is raised
            os.umask(umask)
        assert not socket_path.exists()
        # the database was closed: a new writer can take it at once
        conn = sqlite3.connect(config.state_dir / "agent.db", timeout=0)
        conn.execute("BEGIN IMMEDIATE")
        conn.rollback()
        conn.close()
