"""The fleet that ``bench/fleet.py`` rolls a model out to: its broker, control plane, keys and
devices' bundles, each made the way an operator makes them, and the process readings it takes.

* :class:`Broker`: a Mosquitto of its own on a free loopback port, with a configuration fit for
  a thousand clients (never the shared broker on port 1883);
* :class:`Fleet`: ``fleet-init`` (the provisioning library's :func:`init_fleet`), ``edgelm
  control run`` as a subprocess on SQLite, ``edgelm fleet models push`` as a subprocess, and
  one enrollment bundle per device from :func:`issue_device`, the function behind ``edgelm
  provision device``;
* :func:`proc_reading`: a process's RSS and CPU time from /proc.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm_provisioning.enrollment import issue_device
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet
from edgelm_provisioning.toml_file import dump_toml

if TYPE_CHECKING or __package__:
    from bench import harness
else:
    import harness

MOSQUITTO = "/usr/sbin/mosquitto"
TINY_GGUF = harness.REPO / "tests" / "fixtures" / "tiny-llama.gguf"
FLEET_NAME = "bench"
MODEL_NAME = "tiny"
READY_TIMEOUT_S = 120.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def raise_open_file_limit() -> int:
    """Take the hard limit on open files, for this process and the ones it starts (the
    broker holds a socket per device)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# --------------------------------------------------------------------------- the broker

#: The benchmark broker's settings beyond the listener, and why:
BROKER_SETTINGS = (
    "allow_anonymous true",  # devices send their bundle's credentials; nothing checks them
    "persistence false",  # nothing outlives a run
    "max_connections -1",  # one connection per device, and the control plane's
    # The control plane's session must never drop a device's report: Mosquitto's default
    # (1,000 queued QoS 1 messages per client) drops the rest when the plane falls behind.
    "max_queued_messages 0",
    "set_tcp_nodelay true",  # small messages: no Nagle delay on each device's reports
    "log_dest stderr",
    "log_type error",
    "log_type warning",
    "log_type notice",
    "connection_messages false",  # a line per device connecting says nothing here
)


def broker_config(port: int, workdir: Path) -> str:
    lines = [
        "per_listener_settings false",
        f"listener {port} 127.0.0.1",
        f"persistence_location {workdir}/",
        *BROKER_SETTINGS,
    ]
    if os.geteuid() == 0:  # as root, mosquitto would drop to a user that cannot write here
        lines.append("user root")
    return "\n".join(lines) + "\n"


class Broker(harness.ServerProcess):
    def __init__(self, workdir: Path) -> None:
        self.port = harness.free_port()
        config = workdir / "mosquitto.conf"
        config.write_text(broker_config(self.port, workdir))
        super().__init__("mosquitto", [MOSQUITTO, "-c", str(config)], workdir / "mosquitto.log")

    def wait_ready(self) -> None:
        wait_until(self, lambda: _port_open(self.port), "mosquitto to listen")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


# --------------------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class ControlSettings:
    """What the bench changes in the control.toml that fleet-init writes (the rest are its
    defaults): JSON logs at ``log_level``, so a thousand devices' lines stay cheap."""

    log_level: str = "warning"

    def overrides(self) -> dict[str, Any]:
        return {"log_format": "json", "log_level": self.log_level}


class Fleet:
    """A fleet directory and its control plane (started by :meth:`start_control`)."""

    def __init__(self, workdir: Path, broker_url: str, settings: ControlSettings) -> None:
        self.workdir = workdir
        self.root = workdir / "fleet"
        self.port = harness.free_port()
        self.control_url = f"http://127.0.0.1:{self.port}"
        init_fleet(
            self.root,
            fleet=FLEET_NAME,
            control_url=self.control_url,
            broker_url=broker_url,
            now=int(time.time()),
        )
        self.dir = FleetDir.open(self.root)
        self.token = self.dir.paths.operator_token.read_text().strip()
        self._configure(settings)
        self.control: harness.ServerProcess | None = None

    def _configure(self, settings: ControlSettings) -> None:
        path = self.dir.paths.control_toml
        values = tomllib.loads(path.read_text()) | settings.overrides()
        path.write_text(dump_toml(values))

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.dir.paths.control_dir / 'control.db'}"

    def start_control(self) -> harness.ServerProcess:
        args = [sys.executable, "-m", "edgelm_cli", "control", "run"]
        args += ["--config", str(self.dir.paths.control_toml)]
        self.control = harness.ServerProcess("control plane", args, self.workdir / "control.log")
        wait_until(self.control, self._ready, "the control plane to be ready")
        return self.control

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.control_url}/readyz", timeout=2) as answer:  # noqa: S310  # our own loopback URL
                return bool(answer.status == 200)
        except OSError:
            return False

    def push(self, version: str) -> str:
        """``edgelm fleet models push`` of the tiny GGUF; the model's ``NAME@VERSION``."""
        args = ["fleet", "models", "push", str(TINY_GGUF), "--name", MODEL_NAME]
        args += ["--version", version, "--fleet-dir", str(self.root), "--json"]
        self.edgelm(*args)
        return f"{MODEL_NAME}@{version}"

    def edgelm(self, *args: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
        done = subprocess.run(
            [sys.executable, "-m", "edgelm_cli", *args],
            cwd=harness.REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"edgelm {' '.join(args)} failed:\n{done.stderr}{done.stdout}")
        return done.stdout

    def issue(self, device_ids: Sequence[str], bundles_dir: Path) -> list[Path]:
        """One bundle per device, as ``edgelm provision device ID --class x86`` writes it."""
        bundles_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        now = int(time.time())
        for device_id in device_ids:
            out = bundles_dir / f"{device_id}.json"
            issue_device(
                self.dir,
                device_id,
                hardware_class="x86",
                labels={"site": "bench"},
                out=out,
                reissue=False,
                now=now,
            )
            paths.append(out)
        return paths


# --------------------------------------------------------------------------- processes


def wait_until(
    process: harness.ServerProcess,
    condition: Any,
    what: str,
    timeout_s: float = READY_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        process.check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}:\n{process.log_tail()}")
        time.sleep(0.05)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class ProcReading:
    """One process's resident memory and CPU time so far (0 once it is gone)."""

    rss_kb: int
    cpu_s: float


def proc_reading(pid: int) -> ProcReading:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text()
    except OSError:
        return ProcReading(0, 0.0)
    fields = stat.rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return ProcReading(int(statm.split()[1]) * PAGE_KB, cpu_s)
