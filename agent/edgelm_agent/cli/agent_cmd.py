"""``edgelm agent run``: start the daemon in the foreground (systemd runs it this way too)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import click
import structlog
from rich.console import Console
from rich.panel import Panel

from edgelm_agent.config import load_config, load_settings, with_enrollment
from edgelm_agent.daemon import Daemon, ReadyInfo
from edgelm_agent.enrollment import read_bundle, write_enrollment
from edgelm_agent.enrollment_key import clear_pending, make_request, pair_pending_key
from edgelm_agent.errors import ConfigError, EdgelmError, ModelError
from edgelm_agent.logs import configure_logging
from edgelm_agent.registry.factory import registry_for
from edgelm_agent.state_dir import prepare_state_dir
from edgelm_cli.diagnostics import DiagnosticError
from edgelm_cli.groups import SuggestingGroup
from edgelm_protocol.repository.atomic_file import write_atomic


@click.group(cls=SuggestingGroup)
def agent() -> None:
    """Run and inspect the on-device agent."""


def _edgelm_command() -> str:
    """How to call ``edgelm`` from another terminal, as a command that works when pasted: the
    bare name only if the ``edgelm`` on PATH is this one (in a virtualenv it usually is not)."""
    beside = Path(sys.executable).with_name("edgelm")
    if beside.exists():
        on_path = shutil.which("edgelm")
        if on_path is not None and Path(on_path).resolve() == beside.resolve():
            return "edgelm"
        return shlex.quote(str(beside.absolute()))
    return f"{shlex.quote(sys.executable)} -m edgelm_cli"


def _banner(info: ReadyInfo) -> None:
    """How to call the agent, printed once it is ready, for a person at a terminal. Every
    command works as printed, from any directory."""
    model = info.model_id or "MODEL"
    socket = shlex.quote(str(info.socket_path.absolute()))
    edgelm = _edgelm_command()
    lines = [f"[bold]model[/]  {model}", f"[bold]socket[/] {socket}"]
    body = (
        f'{{"model": "{model}", "max_tokens": 64, '
        '"messages": [{"role": "user", "content": "Hello!"}]}'
    )
    lines += [
        "",
        "[bold]Unix socket[/]",
        f"  curl --unix-socket {socket} http://localhost/v1/chat/completions \\",
        f"    -H 'Content-Type: application/json' -d '{body}'",
        f"  export EDGELM_SOCKET={socket}   # then edgelm commands need no --socket",
        f"  {edgelm} chat --max-tokens 64 'Hello!'",
        f"  {edgelm} models list",
    ]
    if info.http is not None:
        lines += [
            "",
            "[bold]HTTP[/]",
            f"  curl http://{info.http}/v1/chat/completions \\",
            f"    -H 'Content-Type: application/json' -d '{body}'",
            f"  OpenAI client (with {shlex.quote(sys.executable)}):",
            f"    OpenAI(base_url='http://{info.http}/v1', api_key='unused')",
        ]
    if info.model_id is None:
        lines += ["", f"No model is active: {edgelm} models import PATH"]
    Console(stderr=True, highlight=False).print(
        Panel("\n".join(lines), title="edgelm agent ready", expand=False)
    )


def _request_certificate(
    state_dir: str | None, device_id: str, out: Path | None, *, new_key: bool, as_json: bool
) -> None:
    """``enroll --csr``: the pending key and its request; the request goes to stdout (or
    ``out``) for the operator, the key stays in the state directory."""
    try:
        base = load_config(None, {"state_dir": state_dir} if state_dir else {})
        prepare_state_dir(base.state_dir)
        pending = make_request(base.state_dir, device_id, new_key=new_key)
        if out is not None:
            write_atomic(out, pending.request_pem.encode(), mode=0o644)
    except ConfigError as exc:
        raise DiagnosticError(exc.code or "csr-failed", str(exc), as_json=as_json) from exc
    except OSError as exc:
        raise DiagnosticError(
            "csr-failed", f"cannot write the request: {exc}", as_json=as_json
        ) from exc
    structlog.get_logger().info(
        "enrollment_key_pending",
        device=device_id,
        key=str(pending.key_path),
        reused=pending.reused,
        public_key_sha256=pending.public_key_sha256(),
    )
    data = {
        "device_id": device_id,
        "key": str(pending.key_path),
        "request": str(pending.request_path),
        "out": None if out is None else str(out),
        "reused": pending.reused,
        "public_key_sha256": pending.public_key_sha256(),
        "csr": pending.request_pem,
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    if out is None:
        click.echo(pending.request_pem, nl=False)
    console = Console(stderr=True)
    verb = "reused the pending key" if pending.reused else "made a key"
    console.print(f"{verb} for [bold]{device_id}[/] in {pending.key_path} (it stays here)")
    console.print(f"public key sha256 {pending.public_key_sha256()}")
    console.print(
        "give the request to the operator: edgelm provision device "
        f"{device_id} --csr {shlex.quote(str(out or 'request.pem'))} --out {device_id}.json; "
        f"then: edgelm agent enroll {device_id}.json"
    )


def _separate_streams() -> bool:
    """Whether stderr goes somewhere else than stdout. Where both go to one place (journald,
    a log file) the JSON ``agent_ready`` event, which carries the addresses, is the ready
    line: a plain line there would break a stream of JSON lines."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return True
    return (out.st_dev, out.st_ino) != (err.st_dev, err.st_ino)


def _ready_line(info: ReadyInfo) -> None:
    """For a log or a supervisor rather than a person: one line, the addresses in it."""
    http = f"http://{info.http}" if info.http is not None else "off"
    print(
        f"edgelm agent ready: socket={info.socket_path.absolute()} http={http} "
        f"model={info.model_id or 'none'}",
        file=sys.stderr,
        flush=True,
    )


@agent.command("run")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML config file (default: $EDGELM_CONFIG, else none).",
)
@click.option("--state-dir", help="State directory. [default: /var/lib/edgelm]")
@click.option("--socket", help="Unix socket of the local API. [default: /run/edgelm/agent.sock]")
@click.option(
    "--http", help="Loopback HTTP listener HOST:PORT, or 'off'. [default: 127.0.0.1:8470]"
)
@click.option("--model", help="Model to serve: a GGUF file or an ONNX GenAI folder.")
@click.option(
    "--embedding-model",
    help="Model for /v1/embeddings: an installed NAME[@VERSION] of role embedding, or a GGUF "
    "file to import as one.",
)
@click.option("--threads", help="Generation threads. [default: one per core]")
@click.option("--context-length", help="Context window in tokens. [default: 4096]")
@click.option("--default-max-tokens", help="Reply length when a request sets none. [default: 512]")
@click.option(
    "--gpu-layers",
    help="llama.cpp layers on the GPU. [default: all when the build supports it, else 0]",
)
@click.option("--onnx-provider", help="onnxruntime-genai execution provider: cpu or cuda.")
@click.option("--max-queue", help="Requests that may wait for the model. [default: 16]")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    help="[default: auto, JSON unless stdout is a terminal]",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="[default: info]"
)
def run(config_file: Path | None, **flags: Any) -> None:
    """Serve the local API on the Unix socket and loopback HTTP until SIGTERM or SIGINT.

    Settings come from flags, then EDGELM_* environment variables, then the config file, then
    the defaults (docs/operator-guide.md lists them all).
    """
    try:
        config = load_config(config_file, flags)
    except ConfigError as exc:
        raise DiagnosticError(
            "config-invalid", str(exc), hint="see docs/operator-guide.md for every setting"
        ) from exc
    configure_logging(config.log_format, config.log_level)
    on_ready = _banner if sys.stderr.isatty() else _ready_line if _separate_streams() else None
    try:
        asyncio.run(Daemon(config, on_ready=on_ready).run())
    except ConfigError as exc:
        raise DiagnosticError("agent-config", str(exc)) from exc
    except ModelError as exc:
        structlog.get_logger().error("model_load_failed", error=str(exc))
        raise DiagnosticError(
            "model-load-failed",
            str(exc),
            hint="check the path, or run `edgelm agent run` without --model",
        ) from exc


@agent.command("enroll")
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option("--state-dir", help="State directory. [default: /var/lib/edgelm]")
@click.option(
    "--replace",
    is_flag=True,
    help="Leave the fleet this device is enrolled in for the one that issued BUNDLE.",
)
@click.option(
    "--csr",
    "make_csr",
    is_flag=True,
    help="Instead of enrolling: make this device's TLS key here (it never leaves) and write "
    "a certificate signing request for the operator (`edgelm provision device ID --csr`).",
)
@click.option("--device-id", metavar="ID", help="With --csr: the device id to ask for.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --csr: also write the request to this file. [default: stdout]",
)
@click.option(
    "--new-key",
    is_flag=True,
    help="With --csr: make a new key even if one is pending (its request becomes useless).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def enroll(
    bundle: Path | None,
    state_dir: str | None,
    replace: bool,
    make_csr: bool,
    device_id: str | None,
    out: Path | None,
    new_key: bool,
    as_json: bool,
) -> None:
    """Join the fleet that issued BUNDLE (from `edgelm provision device`), with the agent
    stopped. Afterwards `edgelm agent run --state-dir DIR` syncs with no further flags.

    The device's trust root is replaced by the fleet's, and installed models are kept only
    if the fleet's signed metadata lists them. A BUNDLE signed from this device's own request
    (`--csr`) carries no key: it is paired with the key made here, and refused if its
    certificate is for another key.
    """
    configure_logging("console", "info", stream=sys.stderr)
    if make_csr:
        if bundle is not None or device_id is None:
            raise DiagnosticError(
                "enroll-usage",
                "--csr makes a request, it takes --device-id ID and no BUNDLE",
                hint="edgelm agent enroll --csr --device-id ID [--out request.pem]",
                as_json=as_json,
            )
        _request_certificate(state_dir, device_id, out, new_key=new_key, as_json=as_json)
        return
    if bundle is None or device_id is not None or out is not None or new_key:
        raise DiagnosticError(
            "enroll-usage",
            "expected BUNDLE (--device-id, --out and --new-key go with --csr)",
            hint="edgelm agent enroll BUNDLE --state-dir DIR",
            as_json=as_json,
        )
    try:
        # The configuration without the current enrollment: after write_enrollment the
        # registry is built from it and the NEW bundle, never the previous fleet's mirrors.
        settings = load_settings(None, {"state_dir": state_dir} if state_dir else {})
        base = with_enrollment(settings)
        enrollment, root = read_bundle(bundle)
        own_key = enrollment.tls_ca is not None and enrollment.tls_key is None
        enrollment = pair_pending_key(base.state_dir, enrollment)
    except ConfigError as exc:
        raise DiagnosticError(exc.code or "enroll-failed", str(exc), as_json=as_json) from exc
    current = base.enrollment
    if (
        current is not None
        and not replace
        and (current.fleet, current.device_id)
        != (
            enrollment.fleet,
            enrollment.device_id,
        )
    ):
        raise DiagnosticError(
            "already-enrolled",
            f"this device is {current.device_id} in fleet {current.fleet}",
            hint="pass --replace to leave that fleet for the bundle's",
            as_json=as_json,
        )
    prepare_state_dir(base.state_dir)
    try:
        with registry_for(base).locked():
            write_enrollment(base.state_dir, enrollment, root)
            change = registry_for(with_enrollment(settings)).adopt_trust_root(root)
    except EdgelmError as exc:
        raise DiagnosticError(
            f"enroll-{exc.code}", str(exc), hint="stop the agent first", as_json=as_json
        ) from exc
    if own_key:
        clear_pending(base.state_dir)
    structlog.get_logger().warning(
        "trust_root_replaced",
        fleet=enrollment.fleet,
        device=enrollment.device_id,
        previous_root="local" if change.old_root else None,
        models_kept=change.kept,
        models_dropped=change.dropped,
        repository_reachable=change.repository_reachable,
    )
    data = {
        "fleet": enrollment.fleet,
        "device_id": enrollment.device_id,
        "state_dir": str(base.state_dir),
        "models_kept": change.kept,
        "models_dropped": change.dropped,
        "repository_reachable": change.repository_reachable,
        "key_made_on_device": own_key,
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console = Console(stderr=True)
    console.print(f"enrolled [bold]{enrollment.device_id}[/] in fleet [bold]{enrollment.fleet}[/]")
    if change.dropped:
        why = "" if change.repository_reachable else " (the fleet's repository was unreachable)"
        console.print(f"not kept{why}: {', '.join(change.dropped)}")
    console.print(f"start it with: edgelm agent run --state-dir {shlex.quote(str(base.state_dir))}")
