"""What every operator command shares: connection options, ``--json``, and how errors show.

Exit statuses of ``edgelm fleet`` and ``edgelm provision`` commands:

* ``0``: done;
* ``1``: an error, shown as a diagnostic (what failed, the context, a hint, a reference) on
  stderr, or as ``{"error": {...}}`` on stdout with ``--json``. The reference is the control
  plane's own error ``code`` when the server refused the request (``not_found``,
  ``conflict`` ...), and ours otherwise (``control-unreachable``, ``fleet-exists`` ...);
* ``2``: the command line itself is wrong (an unknown option, a missing argument, options
  that exclude each other), as for every click command;
* ``3``: ``rollouts watch`` only: the rollout ended ``failed`` or ``aborted``;
* ``4``: ``rollouts watch --exit-on-halt`` only: the rollout halted or was paused, and waits
  for the operator.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from edgelm_cli.diagnostics import DiagnosticError
from edgelm_provisioning.control_client import ControlClient
from edgelm_provisioning.errors import (
    ControlPlaneError,
    ControlRequestFailed,
    FleetDirError,
    InvalidModelSource,
    InvalidValue,
    ProvisioningError,
)
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.operator_tls import fleet_ssl_context
from edgelm_provisioning.settings import OperatorSettings, resolve_settings

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_ROLLOUT_FAILED = 3
EXIT_ROLLOUT_HALTED = 4

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True, highlight=False)
#: Tables written to a pipe or a file are not squeezed into 80 columns (rich's default there).
PIPE_WIDTH = 240


def out_console() -> Console:
    """A console on stdout for tables: the terminal's width, or wide when piped."""
    return Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


def diagnostic(exc: ProvisioningError, *, as_json: bool) -> DiagnosticError:
    """The one translation of the package's errors into the CLI's diagnostics."""
    context: str | None = None
    if isinstance(exc, ControlRequestFailed):
        context = f"HTTP {exc.status_code} from {exc.method} {exc.url}"
        if exc.param:
            context += f" (about {exc.param})"
    elif isinstance(exc, ControlPlaneError):
        context = exc.url
    elif isinstance(exc, FleetDirError | InvalidModelSource):
        context = str(exc.path)
    elif isinstance(exc, InvalidValue):
        context = f"in {exc.param}"
    return DiagnosticError(
        exc.reference, exc.message, context=context, hint=exc.hint, as_json=as_json
    )


def translated(fn: F) -> F:
    """Run a command body, showing a ProvisioningError as a diagnostic (``--json`` aware)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ProvisioningError as exc:
            raise diagnostic(exc, as_json=bool(kwargs.get("as_json"))) from exc

    return wrapper  # type: ignore[return-value]


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(fn)


def connection_options(fn: F) -> F:
    """``--control``, ``--token``, ``--fleet-dir`` and ``--json``, and error translation."""
    fn = translated(fn)
    fn = json_option(fn)
    fn = click.option(
        "--fleet-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="The fleet directory (fleet-init): its control URL and operator-token are the "
        "defaults.",
    )(fn)
    fn = click.option(
        "--token",
        metavar="TOKEN",
        help="Operator bearer token. [default: $EDGELM_CONTROL_TOKEN, else DIR/operator-token]",
    )(fn)
    return click.option(
        "--control",
        metavar="URL",
        help="Control-plane URL. [default: $EDGELM_CONTROL_URL, else fleet.toml's control_url]",
    )(fn)


@dataclass(frozen=True)
class Operator:
    """One command's connection to the control plane and its output mode."""

    settings: OperatorSettings
    as_json: bool

    @classmethod
    def connect(
        cls, *, control: str | None, token: str | None, fleet_dir: Path | None, as_json: bool
    ) -> Operator:
        settings = resolve_settings(control=control, token=token, fleet_dir=fleet_dir)
        return cls(settings, as_json)

    @property
    def fleet(self) -> FleetDir | None:
        return self.settings.fleet

    def call(self, action: Callable[[ControlClient], Awaitable[T]]) -> T:
        """Run ``action`` with a client for this command's control plane."""

        async def go() -> T:
            async with ControlClient(
                self.settings.control_url,
                self.settings.token,
                ssl_context=fleet_ssl_context(self.fleet.paths.root if self.fleet else None),
            ) as client:
                return await action(client)

        return asyncio.run(go())

    def get(self, path: str, query: list[tuple[str, str]] | None = None) -> Any:
        return self.call(lambda client: client.get(path, query))

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.call(lambda client: client.post(path, body))

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        emit(data, as_json=self.as_json, human=human)


def emit(data: Any, *, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human()


def page_query(limit: int | None, cursor: str | None) -> list[tuple[str, str]]:
    query: list[tuple[str, str]] = []
    if limit is not None:
        query.append(("limit", str(limit)))
    if cursor:
        query.append(("cursor", cursor))
    return query


def page_options(fn: F) -> F:
    fn = click.option("--cursor", help="Continue after this cursor (from the previous page).")(fn)
    return click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)(fn)
