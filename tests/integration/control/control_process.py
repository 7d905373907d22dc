"""``edgelm control run`` as a subprocess: started, waited for, stopped, killed.

The process prints ``edgelm control ready: http=http://HOST:PORT ...`` on stderr once it
serves; :meth:`ControlProcess.wait_ready` reads the address from that line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.integration.control.fleet import Fleet

READY = re.compile(rb"edgelm control ready: http=(https?://[^ ]+)")


def write_config(fleet: Fleet, broker_port: int, **overrides: Any) -> Path:
    """Write ``control.toml`` as fleet-init would, with test settings and ``overrides``."""
    values: dict[str, Any] = {
        "fleet": fleet.name,
        "http": "127.0.0.1:0",
        "db": "sqlite:///control.db",
        "broker_url": f"mqtt://127.0.0.1:{broker_port}",
        "repository_dir": "repository",
        "keys_dir": "keys",
        "tokens_file": "tokens.json",
        "engine_tick_s": 0.2,
        "ingest_flush_interval_s": 0.01,
        "log_format": "json",
    } | overrides
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = fleet.control_dir / "control.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class ControlProcess:
    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log
        self.url = ""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
        environment |= env or {}
        with log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgelm_cli", "control", "run", "--config", str(config)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=environment,
            )

    def log(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def wait_ready(self, timeout_s: float = 60) -> ControlProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = READY.search(self.log_path.read_bytes())
            if found:
                self.url = found.group(1).decode()
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"control plane exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"control plane not ready after {timeout_s} s:\n{self.log()}")

    def wait(self, timeout_s: float = 60) -> int:
        return self.proc.wait(timeout=timeout_s)

    def terminate(self, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
