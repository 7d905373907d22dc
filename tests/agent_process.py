"""Start a real agent in a subprocess, the way systemd would, and talk to it.

Tests use this rather than an in-process app so that signals, exit codes, the Unix socket's
mode and every byte on the wire are the real ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
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
        )

    def wait_ready(self, timeout_s: float = 120) -> AgentProcess:
        """Return once /readyz answers 200. On failure the agent is stopped before the error
        is raised: callers write ``AgentProcess(...).wait_ready()`` before their try/finally,
        and a test must not leave an agent behind."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.logs()}")
            if self.socket.exists() and self.is_ready():
                return self
            time.sleep(0.05)
        logs = self.logs()
        self.stop()
        raise TimeoutError(f"agent not ready after {timeout_s}s:\n{logs}")

    def is_ready(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(2)
            s.connect(str(self.socket))
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False
        finally:
            s.close()

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
