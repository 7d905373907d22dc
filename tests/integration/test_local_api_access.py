"""The local API's access model, per-client limits and provenance, against real agents.

* the Unix socket is mode 0660 and owned by the configured group;
* admin operations (registry changes) over HTTP need the admin token; generation needs only
  the normal one;
* one HTTP client over its rate gets 429 with ``Retry-After`` while another is served (a
  bucket that refills once in 1,000 s: the test counts, it does not time);
* every generation names the model's digest and signer, in its headers and its log line.
"""

from __future__ import annotations

import grp
import hashlib
import http.client
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import TINY_GGUF, AgentProcess

USER = "user-token-0123456789"
ADMIN = "admin-token-9876543210"
CHAT = {
    "model": "tiny-llama",
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 4,
    "temperature": 0,
}


def http_call(
    agent: AgentProcess,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request over the agent's HTTP listener: status, headers, JSON body (or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        parsed: Any = json.loads(raw)
    except json.JSONDecodeError:
        parsed = raw.decode(errors="replace")
    return response.status, dict(response.headers), parsed


def other_group() -> grp.struct_group:
    """A group, not this process's primary one, that it may give a file to."""
    mine = os.getegid()
    usable = os.getgroups() if os.geteuid() != 0 else [g.gr_gid for g in grp.getgrall()]
    for gid in usable:
        if gid != mine:
            return grp.getgrgid(gid)
    pytest.skip("no second group this user may give a file to")


class TestSocketGroup:
    def test_the_socket_is_0660_and_owned_by_the_configured_group(self, start_agent):
        """socket_group names the group whose members may call the socket."""
        group = other_group()
        agent = start_agent(None, ready=False, env={"EDGELM_SOCKET_GROUP": group.gr_name})
        agent.wait_alive()
        info = agent.socket.stat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == group.gr_gid

    def test_an_unknown_group_stops_the_agent_with_its_name(self, start_agent):
        """A typo in socket_group is an error at start-up, not a socket nobody can use."""
        agent = start_agent(None, ready=False, env={"EDGELM_SOCKET_GROUP": "no-such-group-edgelm"})
        assert agent.wait(timeout_s=60) != 0
        assert "socket_group 'no-such-group-edgelm': no such group" in agent.logs()


class TestAdminOverHttp:
    def test_admin_needs_the_admin_token_and_generation_the_normal_one(self, start_agent):
        """The api_token lets a kiosk app chat and read, not change the registry (403); no
        token or a wrong one is a 401 there too; the admin_token does both; the socket needs
        neither."""
        agent = start_agent(env={"EDGELM_API_TOKEN": USER, "EDGELM_ADMIN_TOKEN": ADMIN})
        status, _, body = http_call(agent, "POST", "/v1/registry/gc", token=USER)
        assert status == 403, body  # a known client that may not
        assert body["error"]["code"] == "admin_required"
        assert "admin_token" in body["error"]["message"]
        assert "Unix socket" in body["error"]["message"]
        for token in (None, "wrong"):  # no valid token at all: 401, as on every route
            status, headers, body = http_call(agent, "POST", "/v1/registry/gc", token=token)
            assert status == 401, body
            assert body["error"]["code"] == "invalid_api_key"
            assert "admin_token" in body["error"]["message"]
            assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _, body = http_call(
            agent, "POST", "/v1/registry/pin", {"model": "tiny-llama@x"}, token=USER
        )
        assert status == 403, body  # refused before the body is even looked at

        status, _, body = http_call(agent, "POST", "/v1/registry/gc", token=ADMIN)
        assert status == 200, body
        assert body == {"removed": [], "freed_bytes": 0}
        assert agent.request("POST", "/v1/registry/gc")[0] == 200  # the socket: no token

        status, _, body = http_call(agent, "POST", "/v1/chat/completions", CHAT, token=USER)
        assert status == 200, body
        assert http_call(agent, "GET", "/v1/registry/models", token=USER)[0] == 200
        assert http_call(agent, "POST", "/v1/chat/completions", CHAT, token=ADMIN)[0] == 200

    def test_without_an_admin_token_admin_is_for_the_socket_only(self, start_agent):
        """No admin_token set: every registry change over HTTP is refused, saying how to
        get one; reads are served."""
        agent = start_agent(None, ready=False)
        agent.wait_alive()
        status, _, body = http_call(agent, "POST", "/v1/registry/rollback")
        assert status == 403, body
        assert body["error"]["code"] == "admin_required"
        assert "set admin_token" in body["error"]["message"]
        assert http_call(agent, "GET", "/v1/registry/models")[0] == 200


class TestRateLimit:
    def test_a_runaway_client_gets_429_while_another_is_served(self, start_agent):
        """Three requests fill a client's bucket; its fourth is refused with Retry-After and
        the JSON error; other clients (another token, or none) are still served."""
        env = {"EDGELM_HTTP_CLIENT_RATE_PER_S": "0.001", "EDGELM_HTTP_CLIENT_BURST": "3"}
        agent = start_agent(None, ready=False, env=env)
        agent.wait_alive()  # over the socket, which is not limited
        for _ in range(3):
            assert http_call(agent, "GET", "/v1/models", token="kiosk-a")[0] == 200
        status, headers, body = http_call(agent, "GET", "/v1/models", token="kiosk-a")
        assert status == 429, body
        assert int(headers["Retry-After"]) >= 1
        assert body["error"]["code"] == "rate_limited"
        assert body["error"]["type"] == "rate_limit_error"
        assert "kiosk-a" not in body["error"]["message"]  # the token is never echoed
        assert http_call(agent, "GET", "/v1/models", token="kiosk-b")[0] == 200
        assert http_call(agent, "GET", "/v1/models")[0] == 200  # keyed by its address
        assert http_call(agent, "GET", "/v1/models", token="kiosk-a")[0] == 429
        for _ in range(10):  # the socket is exempt
            assert agent.request("GET", "/v1/models")[0] == 200


def root_targets_keyids(agent: AgentProcess) -> set[str]:
    root = json.loads((agent.workdir / "state/registry/metadata/root.json").read_text())
    return set(root["signed"]["roles"]["targets"]["keyids"])


def wait_job(agent: AgentProcess, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, job = agent.request("GET", f"/v1/jobs/{job_id}")
        assert status == 200, job
        if job["state"] in ("succeeded", "failed", "dead"):
            return dict(job)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish:\n{agent.logs()}")


class TestProvenance:
    def test_generations_carry_the_models_digest_and_signer(self, start_agent):
        """Chat and completions, streamed or not, name the sha256 of the signed target that
        answered and the targets key that signed it; so do their log lines and the job's."""
        agent = start_agent()
        digest = "sha256:" + hashlib.sha256(Path(TINY_GGUF).read_bytes()).hexdigest()
        signers = root_targets_keyids(agent)
        assert signers
        requests = [
            ("/v1/chat/completions", CHAT),
            ("/v1/chat/completions", {**CHAT, "stream": True}),
            ("/v1/completions", {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 3}),
        ]
        for path, body in requests:
            status, headers, answer = http_call(agent, "POST", path, body)
            assert status == 200, answer
            assert headers["X-Edgelm-Model-Digest"] == digest
            assert set(headers["X-Edgelm-Model-Signer"].split(",")) == signers
            assert headers["X-Edgelm-Model"].startswith("tiny-llama@")

        generations = [e for e in agent.log_events("request_finished") if "model" in e]
        assert len(generations) == 3
        for line in generations:
            assert line["model_digest"] == digest.removeprefix("sha256:")
            assert set(line["model_signer"].split(",")) == signers

        status, job = agent.request("POST", "/v1/jobs", {"request": {**CHAT, "max_tokens": 2}})
        assert status == 202, job
        assert wait_job(agent, job["id"])["state"] == "succeeded"
        [done] = agent.log_events("job_succeeded")
        assert done["model_digest"] == digest.removeprefix("sha256:")
        assert set(done["model_signer"].split(",")) == signers
