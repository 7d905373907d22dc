"""``edgelm agent run``: start the daemon in the foreground (systemd runs it this way too)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click
import structlog
from rich.console import Console
from rich.panel import Panel

from edgelm_agent.config import load_config
from edgelm_agent.daemon import Daemon, ReadyInfo
from edgelm_agent.errors import ConfigError, ModelError
from edgelm_agent.logs import configure_logging
from edgelm_cli.diagnostics import DiagnosticError


@click.group()
def agent() -> None:
    """Run and inspect the on-device agent."""


def _banner(info: ReadyInfo) -> None:
    """How to call the agent, printed once it is ready, for a person at a terminal."""
    model = info.model_id or "MODEL"
    lines = [f"[bold]model[/]  {model}", f"[bold]socket[/] {info.socket_path}"]
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    lines += [
        "",
        "[bold]Unix socket[/]",
        f"  curl --unix-socket {info.socket_path} http://localhost/v1/chat/completions \\",
        f"    -H 'Content-Type: application/json' -d '{body}'",
        f"  edgelm chat --socket {info.socket_path} 'Hello!'",
    ]
    if info.http is not None:
        lines += [
            "",
            "[bold]HTTP[/]",
            f"  curl http://{info.http}/v1/chat/completions \\",
            f"    -H 'Content-Type: application/json' -d '{body}'",
            f"  OpenAI client: base_url='http://{info.http}/v1', api_key='unused'",
        ]
    Console(stderr=True).print(Panel("\n".join(lines), title="edgelm agent ready", expand=False))


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
@click.option("--threads", help="Generation threads. [default: one per core]")
@click.option("--context-length", help="Context window in tokens. [default: 4096]")
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
    on_ready = _banner if sys.stderr.isatty() else None
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
