"""``edgelm control run``: the control plane in the foreground (systemd runs it this way too).

SIGTERM and SIGINT stop it cleanly (see :mod:`edgelm_control.service`) and it exits 0; a
configuration error exits 2 with the reason, before anything starts. Under systemd
(``Type=notify``) it says ``READY=1`` once it listens with its store migrated, ``STATUS=``
lines, ``WATCHDOG=1`` from the event loop and ``STOPPING=1`` (see
:mod:`edgelm_protocol.systemd_notify`, shared with the agent); without ``NOTIFY_SOCKET``, nothing.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import click

from edgelm_control.config import load_config
from edgelm_control.errors import ConfigError
from edgelm_control.logs import configure_logging
from edgelm_control.service import ControlService
from edgelm_protocol.systemd_notify import ServiceNotifier


@click.group()
def control() -> None:
    """Run the fleet's control plane (server)."""


@control.command("run")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="control.toml (default: $EDGELM_CONTROL_CONFIG).",
)
@click.option("--http", help="HOST:PORT to listen on. [default: 127.0.0.1:8480]")
@click.option("--db", help="sqlite:///PATH or postgresql://... [default: sqlite in data_dir]")
@click.option("--broker-url", help="mqtt://HOST:PORT of the fleet's broker.")
@click.option("--replica", help="This replica's name (client id control-FLEET-REPLICA).")
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]))
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_file: Path | None, **flags: str | None) -> None:
    """Serve the REST API, the TUF repository and the fleet link until stopped."""
    try:
        config = load_config(config_file, flags)
    except ConfigError as exc:
        click.echo(f"edgelm control: {exc}", err=True)
        sys.exit(2)
    configure_logging(config.log_format, config.log_level)
    try:
        asyncio.run(_serve(ControlService(config)))
    except ConfigError as exc:
        click.echo(f"edgelm control: {exc}", err=True)
        sys.exit(2)


async def _serve(service: ControlService) -> None:
    loop = asyncio.get_running_loop()
    notifier = ServiceNotifier.from_environment()

    def stop() -> None:
        notifier.stopping()
        service.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    status = loop.create_task(notifier.run(lambda: service_status(service)))
    task = loop.create_task(service.run())
    ready = loop.create_task(service.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if service.info is not None:
        info = service.info
        # For people and supervisors: one line with the address (the port may be chosen).
        print(
            f"edgelm control ready: http={info.scheme}://{info.http_host}:{info.http_port} "
            f"fleet={info.fleet} db={info.db} broker={info.broker}",
            file=sys.stderr,
            flush=True,
        )
        notifier.ready(service_status(service))
    try:
        await task
    finally:
        ready.cancel()
        notifier.stopping()
        status.cancel()
        await asyncio.gather(status, return_exceptions=True)
        notifier.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def service_status(service: ControlService) -> str:
    """The ``STATUS=`` line ``systemctl status`` shows."""
    info = service.info
    if info is None:
        return "starting: migrating the store, indexing the repository"
    link = service.link
    broker = "connected to" if link is not None and link.connected else "reconnecting to"
    return (
        f"serving fleet {info.fleet} on {info.scheme}://{info.http_host}:{info.http_port}; "
        f"{broker} the broker {info.broker}"
    )
