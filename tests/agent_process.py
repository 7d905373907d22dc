"""Start a real agent in a subprocess, the way systemd would, and talk to it.

Tests use this rather than an in-process app so that signals, exit codes, the Unix socket's
mode and every byte on the wire are the real ones.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
TINY_GGUF = FIXTURES / "tiny-llama.gguf"
TINY_ONNX = FIXTURES / "tiny-onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess:
    """One ``edgelm agent run`` process, with its own socket, port and state dir."""

    def __init__(
        self,
        workdir: Path,
        *,
        model: Path | None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        http: bool = True,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.workdir = workdir
        self.socket = workdir / "agent.sock"
        self.port = free_port()
        self.http = f"127.0.0.1:{self.port}"
        self.base_url = f"http://{self.http}"
        self.log_path = workdir / "agent.log"
        args = [
            sys.executable,
            "-m",
            "edgelm_cli",
            "agent",
            "run",
            "--state-dir",
            str(workdir / "state"),
            "--socket",
            str(self.socket),
            "--http",
            self.http if http else "off",
            "--log-format",
            "json",
            "--threads",
            "2",
        ]
        if model is not None:
            args += ["--model", str(model)]
        args += extra_args or []
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
        self._log = open(self.log_path, "wb")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**clean_env, **(env or {})},
            cwd=REPO,
            preexec_fn=preexec_fn,  # tests use it to set resource limits only
        )

    def wait_ready(self, timeout_s: float = 120) -> AgentProcess:
        """Return once /readyz answers 200 (a model is loaded)."""
        return self._wait_for("/readyz", "ready", timeout_s)

    def wait_alive(self, timeout_s: float = 120) -> AgentProcess:
        """Return once /healthz answers 200, for an agent that is never ready (no model)."""
        return self._wait_for("/healthz", "alive", timeout_s)

    def _wait_for(self, path: str, what: str, timeout_s: float) -> AgentProcess:
        """On failure the agent is stopped before the error is raised: callers write
        ``AgentProcess(...).wait_ready()`` before their try/finally, and a test must not leave
        an agent behind."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.logs()}")
            if self._answers_200(path):
                return self
            time.sleep(0.05)
        logs = self.logs()
        self.stop()
        raise TimeoutError(f"agent not {what} after {timeout_s}s:\n{logs}")

    def is_ready(self) -> bool:
        return self._answers_200("/readyz")

    def _answers_200(self, path: str) -> bool:
        try:
            return self.request("GET", path, timeout_s=2)[0] == 200
        except (OSError, http.client.HTTPException):
            return False  # not listening yet, or gone

    def request(
        self, method: str, path: str, body: Any = None, *, timeout_s: float = 60
    ) -> tuple[int, Any]:
        """One request over the Unix socket, without an event loop: the status and the JSON
        body (None if the body is not JSON)."""
        conn = _UnixHTTPConnection(self.socket, timeout_s)
        try:
            payload = None if body is None else json.dumps(body)
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except json.JSONDecodeError:
            return response.status, None

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        events = []
        for line in self.logs().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict) and (event is None or record.get("event") == event):
                    events.append(record)
        return events

    def unix_session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 120) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)  # generous: a loaded CI box drains slowly
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout_s: float) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock
