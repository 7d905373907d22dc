"""``make demo``: a whole fleet on one machine, from keys to a rollout and a remote job.

1. ``edgelm provision fleet-init``: the fleet's keys, repository and control plane config;
2. a broker: Mosquitto when it is installed, else amqtt, an embedded Python broker fit for a
   demo only, which speaks MQTT 3.1.1 only (so the broker URL carries ``?protocol=3.1.1``);
3. the control plane (``edgelm control run``);
4. three agents, each enrolled with its own bundle and state directory;
5. the model pushed and rolled out in two waves (a canary, then the rest), then checked on
   each agent; a remote job run on all three; the fleet's status and the job's results
   printed, with the commands to look around.

Everything lives under ``--dir`` (default ``.edgelm/demo``, replaced on each run) and stops
with Ctrl-C. ``--broker amqtt`` forces the fallback broker (``make demo DEMO_BROKER=amqtt``).
With ``--exit-when-done`` the demo stops everything by itself once the job has run (the tests
use that). Every process it starts runs in its own session, so that Ctrl-C reaches the demo
only and the demo stops them in order (agents, control plane, broker); each also gets SIGTERM
if the demo itself dies.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "SmolLM2-135M-Instruct-Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
MODEL_VERSION = "1.0"
DEVICES = ("kiosk-1", "kiosk-2", "kiosk-3")
PROMPT = "Say hello to the factory floor in one short sentence."
MARKER = ".edgelm-demo"  # only a folder holding this is ever deleted by the demo
JOB_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30
FINAL_JOB_STATES = ("succeeded", "failed", "dead", "cancelled", "expired")
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found is None and os.access("/usr/sbin/mosquitto", os.X_OK):
        found = "/usr/sbin/mosquitto"
    return found


def model_name_for(model: Path) -> str:
    """The name the model is published under: the default model's, or the file's stem."""
    if model == DEFAULT_MODEL:
        return DEFAULT_MODEL_NAME
    name = re.sub(r"[^a-z0-9._-]+", "-", model.stem.lower()).strip("-._")
    return name or "model"


def _die_with_the_demo() -> None:
    """In the child, before exec: SIGTERM when the demo process dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Demo:
    def __init__(self, root: Path, model: Path, *, name: str, broker: str) -> None:
        self.root = root
        self.model = model
        self.model_name = name
        self.fleet = root / "fleet"
        self.mosquitto = find_mosquitto() if broker in ("auto", "mosquitto") else None
        if broker == "mosquitto" and self.mosquitto is None:
            raise SystemExit("demo: --broker mosquitto, but no mosquitto binary is installed")
        self.broker_kind = "mosquitto" if self.mosquitto is not None else "amqtt"
        self.broker_port = free_port()
        self.control_port = free_port()
        self.rollout_id = ""
        # (stage, name, process): stopped by stage, the latest first.
        self.processes: list[tuple[int, str, subprocess.Popen[bytes]]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
        bin_dir = Path(sys.executable).parent
        self.cli = (
            [str(bin_dir / "edgelm")]
            if (bin_dir / "edgelm").exists()
            else [sys.executable, "-m", "edgelm_cli"]
        )

    @property
    def broker_url(self) -> str:
        url = f"mqtt://127.0.0.1:{self.broker_port}"
        # amqtt speaks MQTT 3.1.1 only; devices and the control plane then speak it too.
        return url + "?protocol=3.1.1" if self.broker_kind == "amqtt" else url

    # --- running things ---

    def edgelm(self, *args: str, capture: bool = False) -> str:
        command = [sys.executable, "-m", "edgelm_cli", *args]
        result = subprocess.run(
            command,
            cwd=REPO,
            env=self.env,
            text=True,
            capture_output=capture,
            check=False,
        )
        if result.returncode != 0:
            detail = (result.stderr or "") + (result.stdout or "") if capture else ""
            raise SystemExit(
                f"demo: `edgelm {' '.join(args)}` failed ({result.returncode})\n{detail}"
                f"logs: {self.root}/*.log"
            )
        return result.stdout if capture else ""

    def edgelm_json(self, *args: str) -> Any:
        return json.loads(self.edgelm(*args, "--json", capture=True))

    def start(self, stage: int, name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "wb") as log:  # the child keeps its own copy
            process = subprocess.Popen(
                list(command),
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to the demo, which stops us in order
                preexec_fn=_die_with_the_demo,  # the demo runs no threads
            )
        self.processes.append((stage, name, process))
        with open(self.root / "pids", "a") as pids:
            pids.write(f"{process.pid} {name}\n")
        return process

    def stop_all(self) -> None:
        """SIGTERM the agents, then the control plane, then the broker; each stage is waited
        for (and killed after STOP_TIMEOUT_S) before the next one."""
        for stage in sorted({stage for stage, _, _ in self.processes}, reverse=True):
            group = [(n, p) for s, n, p in self.processes if s == stage and p.poll() is None]
            for _, process in group:
                process.send_signal(signal.SIGTERM)
            for name, process in group:
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    print(f"demo: {name} did not stop; killing it", file=sys.stderr)
                    process.kill()
                    process.wait()

    def check_alive(self) -> None:
        for _, name, process in self.processes:
            if process.poll() is not None:
                raise SystemExit(
                    f"demo: {name} exited ({process.returncode}); see {self.root / (name + '.log')}"
                )

    def wait_until(self, ready: Any, what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: {what} did not come up within {timeout_s:.0f} s")
            time.sleep(0.2)

    # --- the steps ---

    def fleet_init(self) -> None:
        say("1. Fleet keys, repository and control plane configuration")
        self.edgelm(
            "provision",
            "fleet-init",
            str(self.fleet),
            "--fleet",
            "demo",
            "--control-url",
            f"http://127.0.0.1:{self.control_port}",
            "--broker-url",
            self.broker_url,
        )

    def broker(self) -> None:
        folder = self.root / "broker"
        folder.mkdir()
        if self.mosquitto is not None:
            say(f"2. Broker: Mosquitto on 127.0.0.1:{self.broker_port} (MQTT 5)")
            config = folder / "mosquitto.conf"
            lines = [
                f"listener {self.broker_port} 127.0.0.1",
                "allow_anonymous true",
                "persistence true",
                f"persistence_location {folder}/",
                "max_queued_messages 10000",
            ]
            if os.geteuid() == 0:
                lines.append("user root")  # else it drops to `mosquitto`, who cannot write here
            config.write_text("\n".join(lines) + "\n")
            self.start(0, "broker", [self.mosquitto, "-c", str(config)])
        else:
            say(
                f"2. Broker: amqtt on 127.0.0.1:{self.broker_port}, embedded in Python, "
                "MQTT 3.1.1, FOR A DEMO ONLY (install Mosquitto for anything else)"
            )
            broker = REPO / "scripts" / "demo_broker.py"
            self.start(0, "broker", [sys.executable, str(broker), str(self.broker_port)])

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.broker_port)) == 0

        self.wait_until(listening, "the broker", timeout_s=60)

    def control_plane(self) -> None:
        say(f"3. Control plane on http://127.0.0.1:{self.control_port}")
        self.start(
            1,
            "control",
            [*self.cli, "control", "run", "--config", str(self.fleet / "control/control.toml")],
        )
        url = f"http://127.0.0.1:{self.control_port}/readyz"

        def ready() -> bool:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url, timeout=2) as response,  # our own URL
            ):
                return bool(response.status == 200)
            return False

        self.wait_until(ready, "the control plane")

    def agents(self) -> None:
        say(f"4. Three agents, each with its own bundle and state: {', '.join(DEVICES)}")
        for device in DEVICES:
            folder = self.root / device
            folder.mkdir()
            bundle = folder / "bundle.json"
            self.edgelm(
                "provision",
                "device",
                device,
                "--fleet-dir",
                str(self.fleet),
                "--class",
                "x86",
                "--label",
                "site=demo",
                "--out",
                str(bundle),
                "--json",
                capture=True,
            )
            self.edgelm(
                "agent",
                "enroll",
                str(bundle),
                "--state-dir",
                str(folder / "state"),
                "--json",
                capture=True,
            )
            self.start(
                2,
                device,
                [
                    *self.cli,
                    "agent",
                    "run",
                    "--state-dir",
                    str(folder / "state"),
                    "--socket",
                    str(folder / "agent.sock"),
                    "--http",
                    "off",
                    "--threads",
                    "1",
                ],
            )
        for device in DEVICES:
            self.wait_until((self.root / device / "agent.sock").exists, device)
        self.wait_until(self.all_online, "the agents' presence at the control plane")
        print(f"  {len(DEVICES)} agents online, connected to {self.broker_url}", flush=True)

    def all_online(self) -> bool:
        listed = self.edgelm_json("fleet", "devices", "list", "--fleet-dir", str(self.fleet))
        online = {d.get("id") for d in _items(listed) if d.get("presence") == "online"}
        return online >= set(DEVICES)

    def rollout(self) -> None:
        target = f"{self.model_name}@{MODEL_VERSION}"
        say(f"5. Push {self.model.name} as {target}; roll it out: a canary, then the rest")
        fleet = ["--fleet-dir", str(self.fleet)]
        self.edgelm(
            "fleet",
            "models",
            "push",
            str(self.model),
            "--name",
            self.model_name,
            "--version",
            MODEL_VERSION,
            *fleet,
        )
        created = self.edgelm_json(
            "fleet", "rollouts", "create", "--model", target, "--all", "--waves", "1,rest", *fleet
        )
        self.rollout_id = str(created["id"])
        self.edgelm("fleet", "rollouts", "watch", self.rollout_id, *fleet)
        for device in DEVICES:
            socket_path = self.root / device / "agent.sock"
            listed = self.edgelm_json("models", "list", "--socket", str(socket_path))
            active = [m for m in _items(listed) if m.get("active")]
            running = f"{active[0].get('name')}@{active[0].get('version')}" if active else None
            if running != target:
                raise SystemExit(f"demo: {device} runs {running}, not {target}")
            print(f"  {device} serves {target}", flush=True)

    def remote_job(self) -> dict[str, Any]:
        say("6. A remote job on all three devices")
        fleet = ["--fleet-dir", str(self.fleet)]
        job = self.edgelm_json(
            "fleet",
            "jobs",
            "submit",
            PROMPT,
            "--model",
            self.model_name,  # a plain name: the one the devices serve
            "--all",
            "--max-tokens",
            "32",
            *fleet,
        )
        job_id = str(job["id"])
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            shown: dict[str, Any] = self.edgelm_json("fleet", "jobs", "show", job_id, *fleet)
            devices = shown.get("devices", [])
            if len(devices) == len(DEVICES) and all(
                d.get("state") in FINAL_JOB_STATES for d in devices
            ):
                break
            self.check_alive()
            if time.monotonic() > deadline:
                states = {d.get("device"): d.get("state") for d in devices}
                raise SystemExit(f"demo: the job did not finish within {JOB_TIMEOUT_S} s: {states}")
            time.sleep(1)
        self.edgelm("fleet", "jobs", "show", job_id, *fleet)
        return shown

    def status(self, job: dict[str, Any]) -> None:
        say("7. The fleet now")
        fleet_dir = str(self.fleet)
        self.edgelm("fleet", "devices", "list", "--fleet-dir", fleet_dir)
        edgelm = " ".join(self.cli)
        print(
            "\nLook around, from another terminal (the fleet directory holds the control "
            "plane's URL and the operator token):\n"
            f"  {edgelm} fleet devices list --fleet-dir {fleet_dir}\n"
            f"  {edgelm} fleet rollouts show {self.rollout_id} --fleet-dir {fleet_dir}\n"
            f"  {edgelm} fleet jobs show {job.get('id')} --fleet-dir {fleet_dir}\n"
            f"  {edgelm} fleet telemetry --group-by model,hardware_class --fleet-dir {fleet_dir}"
            "   (a batch a minute)\n"
            f"  {edgelm} chat --socket {self.root / 'kiosk-1' / 'agent.sock'} --max-tokens 64 "
            "'Hello!'\n"
            f"Logs: {self.root}/*.log",
            flush=True,
        )
        results = {d.get("device"): d.get("state") for d in job.get("devices", [])}
        succeeded = sum(state == "succeeded" for state in results.values())
        print(
            f"\ndemo: {len(DEVICES)} devices serve {self.model_name}@{MODEL_VERSION} "
            f"(broker: {self.broker_kind}, {self.broker_url}); "
            f"the job succeeded on {succeeded} of {len(DEVICES)}",
            flush=True,
        )


def _items(listed: Any) -> list[dict[str, Any]]:
    """The rows of a `--json` listing: a list, or an object holding one under a known key."""
    if isinstance(listed, list):
        return listed
    if isinstance(listed, dict):
        for key in ("data", "items", "devices", "models"):
            if isinstance(listed.get(key), list):
                return list(listed[key])
    raise SystemExit(f"demo: unexpected JSON listing: {str(listed)[:200]}")


def prepare(root: Path) -> None:
    """An empty ``root``: a previous demo's folder is replaced, anything else is refused."""
    if root.exists():
        if not (root / MARKER).exists() and any(root.iterdir()):
            raise SystemExit(f"demo: {root} exists and is not a demo folder; choose another --dir")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("made by scripts/demo.py; replaced by the next demo run\n")


def run(root: Path, model: Path, *, name: str, broker: str, exit_when_done: bool) -> int:
    prepare(root)
    demo = Demo(root, model, name=name, broker=broker)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        demo.fleet_init()
        demo.broker()
        demo.control_plane()
        demo.agents()
        demo.rollout()
        job = demo.remote_job()
        demo.status(job)
        if not exit_when_done:
            print("\nThe demo fleet runs until Ctrl-C.", flush=True)
            while True:
                demo.check_alive()
                time.sleep(1)
    except KeyboardInterrupt:
        print("\ndemo: stopping", flush=True)
    finally:
        stopping = True
        demo.stop_all()
        print("demo: stopped everything it started", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=REPO / ".edgelm" / "demo")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a GGUF file")
    parser.add_argument("--name", help="the model's name in the fleet (default: from the file)")
    parser.add_argument(
        "--broker",
        choices=("auto", "mosquitto", "amqtt"),
        default="auto",
        help="auto: Mosquitto if installed, else amqtt (MQTT 3.1.1, demo only)",
    )
    parser.add_argument("--exit-when-done", action="store_true")
    args = parser.parse_args(argv)
    model = args.model.absolute()
    if not model.exists():
        raise SystemExit(f"demo: no model at {model}; run `make model` first")
    return run(
        args.dir.absolute(),
        model,
        name=args.name or model_name_for(model),
        broker=args.broker,
        exit_when_done=args.exit_when_done,
    )


if __name__ == "__main__":
    sys.exit(main())
