"""Durable jobs against a real agent: kill -9, bad input, cancellation, expiry, paging, lanes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.agent_process import TINY_GGUF, AgentProcess

URL = "http://localhost"
MODEL = "tiny-llama"
FINAL = {"succeeded", "failed", "cancelled", "expired", "dead"}
LONG_CONTEXT = ["--context-length", "16384"]
LONG_TOKENS = 16000  # tens of seconds of generation: a job that is surely still running
POLL_S = 0.05

StartAgent = Callable[..., AgentProcess]


# --- helpers -----------------------------------------------------------------------------------


def completion(prompt: str, max_tokens: int) -> dict[str, Any]:
    """A greedy completion request: the tiny model answers it the same way every time."""
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


def job_body(prompt: str, max_tokens: int, **fields: Any) -> dict[str, Any]:
    return {"request": completion(prompt, max_tokens), **fields}


def session(agent: AgentProcess, timeout_s: float = 120) -> aiohttp.ClientSession:
    """A client on the agent's Unix socket whose every request is bounded in time."""
    # At most 16 connections at once: a burst of a hundred new connections can overflow the
    # socket's accept backlog on a loaded machine, and that tests the kernel, not the agent.
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(agent.socket), limit=16),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    )


def db_rows(agent: AgentProcess, sql: str) -> list[dict[str, Any]]:
    """Rows read straight from the agent's SQLite file (beside a running agent too: WAL lets a
    reader see every committed transaction without blocking the writer)."""
    conn = sqlite3.connect(agent.workdir / "state" / "agent.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()


def result_messages(agent: AgentProcess) -> list[dict[str, Any]]:
    rows = db_rows(agent, "SELECT body FROM outbox WHERE kind = 'result' ORDER BY seq")
    return [json.loads(r["body"]) for r in rows]


async def submit(s: aiohttp.ClientSession, body: dict[str, Any], status: int = 202) -> Any:
    async with s.post(f"{URL}/v1/jobs", json=body) as r:
        assert r.status == status, await r.text()
        return await r.json()


async def show(s: aiohttp.ClientSession, job_id: str) -> Any:
    async with s.get(f"{URL}/v1/jobs/{job_id}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def cancel(s: aiohttp.ClientSession, job_id: str) -> tuple[int, Any]:
    async with s.delete(f"{URL}/v1/jobs/{job_id}") as r:
        return r.status, await r.json()


async def refused(
    response: aiohttp.ClientResponse, status: int, *, param: str | None = None
) -> dict[str, Any]:
    """The error object of a refusal, after checking its status and the field it names."""
    body = await response.json()
    assert response.status == status, body
    error: dict[str, Any] = body["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


async def list_all(
    s: aiohttp.ClientSession, state: str | None = None, limit: int = 500
) -> list[dict[str, Any]]:
    """Every job, page by page through next_cursor."""
    jobs: list[dict[str, Any]] = []
    params: dict[str, str] = {"limit": str(limit)}
    if state is not None:
        params["state"] = state
    while True:
        async with s.get(f"{URL}/v1/jobs", params=params) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        assert len(page["data"]) <= limit
        jobs += page["data"]
        if page["next_cursor"] is None:
            return jobs
        params["cursor"] = page["next_cursor"]


async def wait_state(
    s: aiohttp.ClientSession, job_id: str, states: set[str], timeout_s: float = 60
) -> Any:
    """Poll a job until it is in one of ``states``; fail with its last view if it never is."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = await show(s, job_id)
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"{job_id} never reached {states}: {job}"
        await asyncio.sleep(POLL_S)


async def wait_all_final(
    s: aiohttp.ClientSession, ids: list[str], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Every job in ``ids`` once all are final, each shown whole (a listed job is only a
    summary, without its result)."""
    wanted = set(ids)
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = {j["id"]: j for j in await list_all(s) if j["id"] in wanted}
        if len(jobs) == len(wanted) and all(j["state"] in FINAL for j in jobs.values()):
            return {job_id: await show(s, job_id) for job_id in ids}
        states = Counter(j["state"] for j in jobs.values())
        assert time.monotonic() < deadline, f"not all final: {states}, {len(jobs)} found"
        await asyncio.sleep(0.2)


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(POLL_S)


async def queue_depth(s: aiohttp.ClientSession) -> float:
    """Interactive requests waiting for the model, from /metrics."""
    async with s.get(f"{URL}/metrics") as r:
        text = await r.text()
    found = re.search(r"^edgelm_queue_depth (\S+)$", text, re.MULTILINE)
    assert found is not None, text
    return float(found.group(1))


async def until_queue_depth(s: aiohttp.ClientSession, depth: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while await queue_depth(s) < depth:
        assert time.monotonic() < deadline, f"never {depth} interactive requests waiting"
        await asyncio.sleep(POLL_S)


def logged(agent: AgentProcess, event: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in agent.log_events(event)
        if all(e.get(name) == value for name, value in fields.items())
    ]


async def interactive_text(
    s: aiohttp.ClientSession, prompt: str, max_tokens: int, request_id: str | None = None
) -> str:
    headers = {"X-Request-Id": request_id} if request_id is not None else None
    body = completion(prompt, max_tokens)
    async with s.post(f"{URL}/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        text: str = (await r.json())["choices"][0]["text"]
        return text


def text_of(job: dict[str, Any]) -> str:
    text: str = job["result"]["choices"][0]["text"]
    return text


@pytest.fixture(scope="module")
def api_agent() -> Iterator[AgentProcess]:
    """One agent for the API tests: a 16k context for long jobs and a 4 KiB body limit."""
    workdir = Path(tempfile.mkdtemp(prefix="edgelm-", dir="/tmp"))
    agent = AgentProcess(
        workdir, model=TINY_GGUF, extra_args=LONG_CONTEXT, env={"EDGELM_MAX_BODY_BYTES": "4096"}
    )
    try:
        yield agent.wait_ready()
    finally:
        agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- kill -9 -----------------------------------------------------------------------------------

JOB_COUNT = 200
BURST_FROM = 100  # jobs from here on arrive at once and queue up
LONG_TOKENS_KILLED = 2000  # long enough to be seen running, short enough to run twice


def kill_test_bodies() -> list[dict[str, Any]]:
    """200 submissions: short greedy jobs, some upstream, some keyed, a long urgent one last."""
    bodies = []
    for i in range(JOB_COUNT - 1):
        body = job_body("good" if i % 3 == 0 else "hello", 3 + i % 18, metadata={"i": i})
        if i % 4 == 0:
            body["report"] = "upstream"
        if i % 5 == 0:
            body["idempotency_key"] = f"k-{i}"
        bodies.append(body)
    # It jumps the queue, so the agent is killed while it runs and the burst still waits.
    long = job_body("hello", LONG_TOKENS_KILLED, priority=1, report="upstream")
    bodies.append({**long, "idempotency_key": "k-long"})
    return bodies


@pytest.mark.timeout(600)  # its own deadlines, not pytest-timeout, should fail it
class TestKill9:
    async def test_no_job_is_lost_or_finished_twice(self, start_agent: StartAgent) -> None:
        """kill -9 while jobs run, restart: all 200 jobs end once, right, reported once."""
        agent = start_agent(TINY_GGUF)
        bodies = kill_test_bodies()
        async with session(agent) as s:
            ids = [(await submit(s, body))["id"] for body in bodies[:BURST_FROM]]
            burst = await asyncio.gather(*(submit(s, body) for body in bodies[BURST_FROM:-1]))
            ids += [job["id"] for job in burst]
            long_id = (await submit(s, bodies[-1]))["id"]
            ids.append(long_id)
            await wait_state(s, long_id, {"running"})
            agent.proc.kill()  # SIGKILL: no shutdown, no cleanup, mid-generation
        agent.wait()
        agent.stop()
        first_run_succeeded = logged(agent, "job_succeeded")  # the restart truncates the log
        at_kill = {r["id"]: r for r in db_rows(agent, "SELECT * FROM jobs")}
        assert set(at_kill) == set(ids)  # every 202 was on disk
        running_at_kill = {i for i, r in at_kill.items() if r["state"] == "running"}
        assert running_at_kill == {long_id}  # one job runs at a time
        assert any(r["state"] == "succeeded" for r in at_kill.values())
        assert any(r["state"] == "queued" for r in at_kill.values())

        again = AgentProcess(agent.workdir, model=None).wait_ready()
        try:
            async with session(again) as s:
                final = await wait_all_final(s, ids, timeout_s=150)
                listed = await list_all(s)
                for i in (0, 5, JOB_COUNT - 1):  # idempotency keys survive the kill
                    same = await submit(s, bodies[i], status=200)
                    assert same["id"] == ids[i]
                assert len(await list_all(s)) == JOB_COUNT  # and made no new job
                sizes = {(b["request"]["prompt"], b["request"]["max_tokens"]) for b in bodies}
                expected = {size: await interactive_text(s, *size) for size in sizes}
        finally:
            again.stop()
        second_run_succeeded = logged(again, "job_succeeded")

        assert Counter(j["id"] for j in listed) == Counter(ids)  # each id once, none lost
        assert {j["state"] for j in final.values()} == {"succeeded"}
        for i, job_id in enumerate(ids):
            job = final[job_id]
            request = bodies[i]["request"]
            assert job["result"] is not None
            assert text_of(job) == expected[(request["prompt"], request["max_tokens"])]
            if request["prompt"] == "good":
                assert text_of(job) == " bye"
            assert job["attempts"] == (2 if job_id in running_at_kill else 1), job

        stored = Counter(
            e["job_id"] for e in first_run_succeeded + second_run_succeeded if e.get("stored")
        )
        assert stored == Counter(ids)  # each result stored once, over both runs

        upstream = {ids[i] for i, b in enumerate(bodies) if b.get("report") == "upstream"}
        messages = result_messages(again)
        assert Counter(m["job_id"] for m in messages) == Counter(upstream)  # once each
        for message in messages:
            assert message["result"] == final[message["job_id"]]["result"]

    async def test_upstream_job_on_its_last_attempt_is_reported_dead(
        self, start_agent: StartAgent
    ) -> None:
        """An upstream job killed on its last attempt ends dead, and headquarters is told."""
        agent = start_agent(TINY_GGUF)
        async with session(agent) as s:
            body = job_body("hello", LONG_TOKENS_KILLED, report="upstream", max_attempts=1)
            job_id = (await submit(s, body))["id"]
            await wait_state(s, job_id, {"running"})
            agent.proc.kill()
        agent.wait()
        agent.stop()
        again = AgentProcess(agent.workdir, model=None).wait_ready()
        try:
            async with session(again) as s:
                job = await wait_state(s, job_id, FINAL)
        finally:
            again.stop()
        assert job["state"] == "dead"
        assert job["attempts"] == 1
        assert job["error"]["code"] == "interrupted"
        messages = result_messages(again)
        assert [m["job_id"] for m in messages] == [job_id]
        assert messages[0]["state"] == "dead"


# --- bad input ---------------------------------------------------------------------------------

GOOD = completion("good", 3)
BAD_SUBMISSIONS = [
    pytest.param({"request": GOOD, "ttl_s": -5}, "ttl_s", id="negative-ttl"),
    pytest.param({"request": GOOD, "ttl_s": 0}, "ttl_s", id="zero-ttl"),
    pytest.param({"request": GOOD, "ttl_s": "soon"}, "ttl_s", id="ttl-not-a-number"),
    pytest.param({"request": GOOD, "deadline": 1000.0}, "deadline", id="deadline-in-the-past"),
    pytest.param({"request": GOOD, "deadline": -1}, "deadline", id="negative-deadline"),
    pytest.param({"request": GOOD, "ttl_s": 5, "deadline": 4e9}, "ttl_s", id="ttl-and-deadline"),
    pytest.param({"request": {**GOOD, "stream": True}}, "request.stream", id="stream"),
    pytest.param({"request": GOOD, "priority": 101}, "priority", id="priority-too-high"),
    pytest.param({"request": GOOD, "priority": -101}, "priority", id="priority-too-low"),
    pytest.param({"request": GOOD, "priority": "high"}, "priority", id="priority-string"),
    pytest.param({"request": GOOD, "priority": 1.5}, "priority", id="priority-float"),
    pytest.param({"request": GOOD, "priority": True}, "priority", id="priority-bool"),
    pytest.param({"request": GOOD, "max_attempts": 0}, "max_attempts", id="no-attempts"),
    pytest.param({"request": GOOD, "max_attempts": 11}, "max_attempts", id="too-many-attempts"),
    pytest.param({"request": GOOD, "max_attempts": "3"}, "max_attempts", id="attempts-string"),
    pytest.param({"request": GOOD, "max_attempts": True}, "max_attempts", id="attempts-bool"),
    pytest.param({"request": GOOD, "report": "sideways"}, "report", id="unknown-report"),
    pytest.param({"request": GOOD, "idempotency_key": ""}, "idempotency_key", id="empty-key"),
    pytest.param({"request": GOOD, "idempotency_key": "k" * 129}, "idempotency_key", id="long-key"),
    pytest.param({"request": GOOD, "idempotency_key": 7}, "idempotency_key", id="key-not-text"),
    pytest.param({"request": GOOD, "metadata": [1, 2]}, "metadata", id="metadata-not-object"),
    pytest.param({}, "request", id="no-request"),
    pytest.param({"request": "good"}, "request", id="request-not-object"),
    pytest.param({"request": {"prompt": "good"}}, "model", id="request-without-model"),
    pytest.param({"request": {**GOOD, "max_tokens": -1}}, "max_tokens", id="bad-max-tokens"),
]


class TestBadInput:
    @pytest.mark.parametrize(("body", "param"), BAD_SUBMISSIONS)
    async def test_bad_submission_is_refused(
        self, api_agent: AgentProcess, body: dict[str, Any], param: str
    ) -> None:
        """A bad submission gets a 400 naming its field, and no job is created."""
        async with session(api_agent) as s:
            before = len(await list_all(s))
            async with s.post(f"{URL}/v1/jobs", json=body) as r:
                error = await refused(r, 400, param=param)
            assert error["type"] == "invalid_request_error"
            assert len(await list_all(s)) == before

    @pytest.mark.parametrize(
        ("query", "param"),
        [
            pytest.param("state=bogus", "state", id="unknown-state"),
            pytest.param("limit=0", "limit", id="limit-zero"),
            pytest.param("limit=501", "limit", id="limit-too-big"),
            pytest.param("limit=ten", "limit", id="limit-not-a-number"),
            pytest.param("cursor=abc", None, id="cursor-not-a-number"),
        ],
    )
    async def test_bad_listing_is_refused(
        self, api_agent: AgentProcess, query: str, param: str | None
    ) -> None:
        """An unknown state filter or a bad limit or cursor gets a 400 naming it."""
        async with session(api_agent) as s, s.get(f"{URL}/v1/jobs?{query}") as r:
            await refused(r, 400, param=param)

    async def test_oversized_submission_is_413(self, api_agent: AgentProcess) -> None:
        """A body over EDGELM_MAX_BODY_BYTES is refused with 413 and creates nothing."""
        async with session(api_agent) as s:
            before = len(await list_all(s))
            body = job_body("good " * 1000, 3)
            async with s.post(f"{URL}/v1/jobs", json=body) as r:
                error = await refused(r, 413)
            assert error["code"] == "payload_too_large"
            assert len(await list_all(s)) == before

    async def test_malformed_json_is_400(self, api_agent: AgentProcess) -> None:
        """A body that is not JSON is refused with 400."""
        async with (
            session(api_agent) as s,
            s.post(
                f"{URL}/v1/jobs", data=b'{"request": ', headers={"Content-Type": "application/json"}
            ) as r,
        ):
            error = await refused(r, 400)
        assert error["type"] == "invalid_request_error"

    async def test_unknown_job_is_404(self, api_agent: AgentProcess) -> None:
        """Showing or cancelling a job that does not exist is 404 job_not_found."""
        async with session(api_agent) as s:
            async with s.get(f"{URL}/v1/jobs/job-doesnotexist") as r:
                assert (await refused(r, 404))["code"] == "job_not_found"
            async with s.delete(f"{URL}/v1/jobs/job-doesnotexist") as r:
                assert (await refused(r, 404))["code"] == "job_not_found"

    async def test_cancelling_a_finished_job_is_409(self, api_agent: AgentProcess) -> None:
        """Cancelling a succeeded job is 409 and leaves it succeeded with its result."""
        async with session(api_agent) as s:
            job = await submit(s, job_body("good", 3))
            await wait_state(s, job["id"], {"succeeded"})
            async with s.delete(f"{URL}/v1/jobs/{job['id']}") as r:
                assert (await refused(r, 409))["code"] == "job_conflict"
            after = await show(s, job["id"])
        assert after["state"] == "succeeded"
        assert text_of(after) == " bye"

    async def test_agent_still_serves_after_bad_input(self, api_agent: AgentProcess) -> None:
        """After all the refusals, jobs and interactive requests are still served."""
        async with session(api_agent) as s:
            job = await submit(s, job_body("good", 3))
            done = await wait_state(s, job["id"], FINAL)
            assert done["state"] == "succeeded"
            assert text_of(done) == " bye"
            assert await interactive_text(s, "good", 3) == " bye"


class TestRunTimeFailures:
    @pytest.mark.parametrize(
        ("request_body", "code"),
        [
            pytest.param(completion("good", 20000), "context_length_exceeded", id="too-long"),
        ],
    )
    async def test_job_that_can_never_run_fails_at_once(
        self, api_agent: AgentProcess, request_body: dict[str, Any], code: str
    ) -> None:
        """A job the model can never run fails on its first attempt with the reason, no retry."""
        async with session(api_agent) as s:
            job = await submit(s, {"request": request_body, "max_attempts": 5})
            done = await wait_state(s, job["id"], FINAL)
        assert done["state"] == "failed"
        assert done["attempts"] == 1
        assert done["error"]["code"] == code
        assert done["result"] is None


# --- idempotency, cancellation, expiry, paging -------------------------------------------------


class TestIdempotency:
    async def test_same_key_twice_is_the_same_job(self, api_agent: AgentProcess) -> None:
        """A repeated idempotency key answers 200 with the first job; a new key makes a new job."""
        key = f"idem-{uuid.uuid4().hex}"
        async with session(api_agent) as s:
            first = await submit(s, job_body("good", 3, idempotency_key=key), status=202)
            again = await submit(s, job_body("good", 3, idempotency_key=key), status=200)
            other = await submit(s, job_body("good", 3, idempotency_key=key + "-2"), status=202)
            done = await wait_state(s, first["id"], FINAL)
            after_run = await submit(s, job_body("good", 3, idempotency_key=key), status=200)
            await wait_state(s, other["id"], FINAL)
            keyed = [j for j in await list_all(s) if j["idempotency_key"] == key]
        assert again["id"] == first["id"]
        assert other["id"] != first["id"]
        assert after_run["id"] == first["id"]
        assert after_run["state"] == done["state"] == "succeeded"
        assert [j["id"] for j in keyed] == [first["id"]]

    async def test_same_key_with_another_body_is_refused(self, api_agent: AgentProcess) -> None:
        """A key replayed with a different submission is 422, not someone else's job; a retry
        that differs only in its TTL is the same submission."""
        key = f"idem-{uuid.uuid4().hex}"
        async with session(api_agent) as s:
            first = await submit(s, job_body("good", 3, idempotency_key=key, ttl_s=60))
            retry = await submit(s, job_body("good", 3, idempotency_key=key, ttl_s=90), status=200)
            async with s.post(f"{URL}/v1/jobs", json=job_body("good", 4, idempotency_key=key)) as r:
                error = await refused(r, 422, param="idempotency_key")
            keyed = [j for j in await list_all(s) if j["idempotency_key"] == key]
        assert retry["id"] == first["id"]
        assert error["code"] == "idempotency_key_reused"
        assert first["id"] in error["message"]
        assert [j["id"] for j in keyed] == [first["id"]]


class TestCancel:
    async def test_cancelled_queued_job_never_runs(self, api_agent: AgentProcess) -> None:
        """A job cancelled while it waits behind a long one is cancelled and never started."""
        async with session(api_agent) as s:
            blocker = await submit(s, job_body("hello", LONG_TOKENS))
            try:
                await wait_state(s, blocker["id"], {"running"})
                waiting = await submit(s, job_body("good", 3, report="upstream"))
                assert waiting["state"] == "queued"
                assert waiting["position"] is not None
                status, cancelled = await cancel(s, waiting["id"])
                assert status == 200, cancelled
                assert cancelled["state"] == "cancelled"
            finally:
                await cancel(s, blocker["id"])
            later = await submit(s, job_body("good", 3))
            await wait_state(s, later["id"], {"succeeded"})  # the worker has gone past it
            job = await show(s, waiting["id"])
        assert job["state"] == "cancelled"
        assert job["attempts"] == 0
        assert job["started_at"] is None
        assert job["result"] is None
        assert job["position"] is None
        assert not logged(api_agent, "job_started", job_id=waiting["id"])
        # headquarters hears how it ended, once
        [told] = [m for m in result_messages(api_agent) if m["job_id"] == waiting["id"]]
        assert told["state"] == "cancelled"
        assert told["error"]["code"] == "cancelled"

    async def test_cancelled_running_job_stops_and_the_next_runs(
        self, api_agent: AgentProcess
    ) -> None:
        """Cancelling a long running job stops its generation; the jobs behind it run."""
        async with session(api_agent) as s:
            long = await submit(s, job_body("hello", LONG_TOKENS))
            try:
                await wait_state(s, long["id"], {"running"})
                behind = [await submit(s, job_body("good", 3)) for _ in range(2)]
                status, cancelled = await cancel(s, long["id"])
                assert status == 200, cancelled
                assert cancelled["state"] == "cancelled"
            finally:
                await cancel(s, long["id"])
            await until(
                lambda: bool(logged(api_agent, "job_cancelled", job_id=long["id"])),
                "the worker to drop the cancelled job",
            )
            done = [await wait_state(s, j["id"], FINAL) for j in behind]
            job = await show(s, long["id"])
        assert [j["state"] for j in done] == ["succeeded", "succeeded"]
        assert [text_of(j) for j in done] == [" bye", " bye"]
        assert job["state"] == "cancelled"
        assert job["result"] is None
        assert not logged(api_agent, "job_succeeded", job_id=long["id"])
        cut = logged(api_agent, "generation_cancelled", request_id=long["id"])
        assert all(e["completion_tokens"] < LONG_TOKENS for e in cut)


class TestExpiry:
    async def test_ttl_passing_while_waiting_expires_the_job(self, api_agent: AgentProcess) -> None:
        """A job whose TTL passes while it waits is expired and never run; a patient one runs."""
        async with session(api_agent) as s:
            blocker = await submit(s, job_body("hello", LONG_TOKENS))
            try:
                await wait_state(s, blocker["id"], {"running"})
                doomed = await submit(s, job_body("good", 3, ttl_s=1, report="upstream"))
                patient = await submit(s, job_body("good", 3, ttl_s=600))
                assert doomed["state"] == "queued"
                assert doomed["deadline"] == pytest.approx(doomed["created_at"] + 1)
                await until(lambda: time.time() > doomed["deadline"], "the TTL to pass")
            finally:
                await cancel(s, blocker["id"])
            expired = await wait_state(s, doomed["id"], FINAL)
            ran = await wait_state(s, patient["id"], FINAL)
        assert expired["state"] == "expired"
        assert expired["attempts"] == 0
        assert expired["started_at"] is None
        assert expired["result"] is None
        assert expired["error"]["code"] == "expired"
        assert not logged(api_agent, "job_started", job_id=doomed["id"])
        assert ran["state"] == "succeeded"
        [told] = [m for m in result_messages(api_agent) if m["job_id"] == doomed["id"]]
        assert told["state"] == "expired"
        assert told["error"]["code"] == "expired"


class TestWithoutAModel:
    async def test_jobs_wait_for_a_model_but_their_deadlines_still_pass(
        self, start_agent: StartAgent
    ) -> None:
        """With no model loaded, jobs wait without spending attempts, and one whose TTL passes
        is expired and reported all the same."""
        agent = start_agent(None, ready=False).wait_alive()  # never ready without a model
        async with session(agent) as s:
            # The agent has no model at all, so these name one that may arrive.
            doomed = await submit(
                s, job_body("good", 3, ttl_s=1, report="upstream", wait_for_model=True)
            )
            patient = await submit(s, job_body("good", 3, wait_for_model=True))
            expired = await wait_state(s, doomed["id"], {"expired"})
            waiting = await show(s, patient["id"])
        assert expired["attempts"] == 0
        assert (waiting["state"], waiting["attempts"]) == ("queued", 0)
        [told] = [m for m in result_messages(agent) if m["job_id"] == doomed["id"]]
        assert told["state"] == "expired"


class TestPaging:
    async def test_cursor_paging_returns_every_job_once(self, api_agent: AgentProcess) -> None:
        """Paging with a small limit, by state or not, returns every job exactly once."""
        tag = uuid.uuid4().hex
        async with session(api_agent) as s:
            mine = [
                (await submit(s, job_body("good", 3, metadata={"tag": tag})))["id"]
                for _ in range(23)
            ]
            while_running = await list_all(s, limit=5)  # paged while the worker changes states
            await wait_all_final(s, mine, timeout_s=60)
            everything = await list_all(s, limit=5)
            succeeded = await list_all(s, state="succeeded", limit=4)
            total = len(await list_all(s))
        for listing in (while_running, everything, succeeded):
            ids = [j["id"] for j in listing]
            assert len(ids) == len(set(ids))  # nothing twice
            assert set(mine) <= set(ids)  # nothing missing
        assert len(everything) == total
        assert all(j["state"] == "succeeded" for j in succeeded)
        created = [j["created_at"] for j in everything]
        assert created == sorted(created)  # in submission order


# --- interactive requests first, jobs never starved -------------------------------------------


@pytest.mark.timeout(600)  # its own deadlines, not pytest-timeout, should fail it
class TestLanes:
    async def test_jobs_complete_under_steady_interactive_load(
        self, api_agent: AgentProcess
    ) -> None:
        """With interactive requests always waiting for the model, jobs still all complete."""
        stop = asyncio.Event()
        statuses: list[int] = []
        async with session(api_agent) as s:

            async def chatter() -> None:
                while not stop.is_set():
                    async with s.post(f"{URL}/v1/completions", json=completion("hello", 30)) as r:
                        await r.read()
                        statuses.append(r.status)

            talkers = [asyncio.create_task(chatter()) for _ in range(3)]
            try:
                await until_queue_depth(s, 1)  # interactive requests queue for the model
                ids = [(await submit(s, job_body("good", 3)))["id"] for _ in range(3)]
                final = await wait_all_final(s, ids, timeout_s=180)
                served_meanwhile = len(statuses)
            finally:
                stop.set()
                await asyncio.gather(*talkers)
        assert {j["state"] for j in final.values()} == {"succeeded"}
        assert served_meanwhile >= 3
        assert set(statuses) == {200}

    @pytest.mark.parametrize(
        ("every", "first"),
        [
            pytest.param(None, "interactive", id="default"),
            pytest.param(
                1,
                "job",
                id="jobs-every-turn",
            ),
        ],
    )
    async def test_lane_order_when_both_wait(
        self, start_agent: StartAgent, every: int | None, first: str
    ) -> None:
        """When a request and a job both wait, the request goes first unless jobs have the turn."""
        env = {"EDGELM_JOBS_BACKGROUND_EVERY": str(every)} if every is not None else None
        agent = start_agent(TINY_GGUF, extra_args=LONG_CONTEXT, env=env)
        async with agent.unix_session() as holder, session(agent) as s:
            stream = await holder.post(
                f"{URL}/v1/completions", json={**completion("hello", LONG_TOKENS), "stream": True}
            )
            try:
                assert stream.status == 200
                await stream.content.readline()  # the stream has the model
                job = await submit(s, job_body("hello", 2000))
                await until(
                    lambda: bool(logged(agent, "job_started", job_id=job["id"])),
                    "the job to wait for the model",
                )
                request = asyncio.create_task(interactive_text(s, "hello", 2000, "probe"))
                await until_queue_depth(s, 1)  # both wait now
            finally:
                stream.close()  # hang up: the stream is cancelled and the model is free
            await request
            await wait_state(s, job["id"], {"succeeded"})
        events = agent.log_events()
        job_done = next(
            n
            for n, e in enumerate(events)
            if e["event"] == "job_succeeded" and e.get("job_id") == job["id"]
        )
        request_done = next(
            n
            for n, e in enumerate(events)
            if e["event"] == "request_finished" and e.get("request_id") == "probe"
        )
        assert ("interactive" if request_done < job_done else "job") == first


# --- clients that misbehave ----------------------------------------------------------------------


class TestHostileClients:
    async def test_clients_hanging_up_mid_submit_do_not_stall_the_queue(
        self, start_agent: StartAgent
    ) -> None:
        """Clients that send a submission and hang up at once leave the queue working."""
        agent = start_agent(TINY_GGUF)
        body = json.dumps({"request": GOOD}).encode()
        raw = (
            b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

        async def hang_up() -> bool:
            try:
                _, writer = await asyncio.open_unix_connection(str(agent.socket))
                writer.write(raw)
                await writer.drain()
            except OSError:
                # A burst can fill the socket's accept backlog while the agent is busy; the kernel
                # then refuses the connection and asyncio reports it as a reset. That is the
                # kernel's back-pressure, not the agent failing, so this client just gave up early.
                return False
            await asyncio.sleep(0.002)  # the client's behaviour: it gives up a moment later
            writer.transport.abort()
            return True

        delivered = 0
        for _ in range(5):
            delivered += sum(await asyncio.gather(*(hang_up() for _ in range(40))))
        assert delivered > 0, "no hostile submission ever reached the agent"
        # Many of the hostile submissions were whole before the hang-up, so they are real jobs
        # queued ahead of this one; the generous wait is for them, not for a stall.
        async with session(agent) as s:
            # The hung-up connections may still hold the agent's connection slots for a
            # moment (it closes each once it notices); a polite client tries again.
            for attempt in range(50):
                try:
                    job = await submit(s, job_body("good", 3))
                    break
                except aiohttp.ClientOSError:
                    assert attempt < 49, "the agent never took a submission again"
                    await asyncio.sleep(0.2)
            done = await wait_state(s, job["id"], FINAL, timeout_s=120)
        assert done["state"] == "succeeded"


# --- the CLI ------------------------------------------------------------------------------------


def jobs_cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgelm_cli", "jobs", *args, "--socket", str(agent.socket)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class TestCli:
    def test_submit_show_list_and_cancel(self, api_agent: AgentProcess) -> None:
        """`edgelm jobs` drives the whole API; --json prints what scripts can parse, and every
        refusal is exit 1 with the agent's reason."""
        key = f"cli-{uuid.uuid4().hex}"
        submit_args = ["submit", "--model", "tiny-llama", "--completion", "good"]
        submit_args += ["--max-tokens", "3", "--idempotency-key", key]
        submitted = jobs_cli(api_agent, *submit_args, "--json")
        assert submitted.returncode == 0, submitted.stderr
        job = json.loads(submitted.stdout)
        assert job["idempotency_key"] == key

        deadline = time.monotonic() + 60
        while True:
            shown = jobs_cli(api_agent, "show", job["id"], "--json")
            state = json.loads(shown.stdout)["state"]
            if state in FINAL:
                break
            assert shown.returncode == 4, shown.stderr  # not finished yet: a script waits
            assert time.monotonic() < deadline, shown.stdout
            time.sleep(0.2)
        assert shown.returncode == 0, shown.stderr  # succeeded
        assert text_of(json.loads(shown.stdout)) == " bye"
        readable = jobs_cli(api_agent, "show", job["id"])
        assert f"{job['id']}: succeeded" in readable.stderr  # status for people on stderr,
        assert readable.stdout == " bye\n"  # the answer alone on stdout, for pipes

        listed = jobs_cli(api_agent, "list", "--state", "succeeded", "--limit", "500", "--json")
        assert listed.returncode == 0, listed.stderr
        assert job["id"] in {j["id"] for j in json.loads(listed.stdout)["data"]}

        again = jobs_cli(api_agent, *submit_args)  # the same key: the same job, not a new one
        assert again.returncode == 0, again.stderr
        assert again.stdout == f"{job['id']}\n"  # the id alone on stdout, for JOB=$(…)
        assert again.stderr.strip() == "succeeded"

        reused = jobs_cli(api_agent, *submit_args[:4], "other", *submit_args[5:], "--json")
        assert reused.returncode == 1
        assert json.loads(reused.stdout)["error"]["reference"] == "agent-idempotency_key_reused"

        finished = jobs_cli(api_agent, "cancel", job["id"])
        assert finished.returncode == 1
        assert "cannot be cancelled" in finished.stderr + finished.stdout

        # A job for a model still to come waits for it; scripts see that and its end.
        unknown_model = ["submit", "--model", "not-here-yet", "--completion", "good"]
        refused = jobs_cli(api_agent, *unknown_model, "--json")
        assert refused.returncode == 1
        assert json.loads(refused.stdout)["error"]["reference"] == "agent-model_not_found"
        doomed = jobs_cli(api_agent, *unknown_model, "--wait-for-model", "--json")
        assert doomed.returncode == 0, doomed.stderr
        doomed_id = json.loads(doomed.stdout)["id"]
        assert jobs_cli(api_agent, "show", doomed_id).returncode == 4  # queued
        assert jobs_cli(api_agent, "cancel", doomed_id).returncode == 0
        ended = jobs_cli(api_agent, "show", doomed_id)
        assert ended.returncode == 3  # ended without a result: a script can tell
        assert f"{doomed_id}: cancelled" in ended.stderr

        unknown = jobs_cli(api_agent, "show", "job-unknown", "--json")
        assert unknown.returncode == 1
        assert "job-unknown" in json.loads(unknown.stdout)["error"]["message"]
