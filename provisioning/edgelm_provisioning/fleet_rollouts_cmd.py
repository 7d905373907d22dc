"""``edgelm fleet rollouts``: send a model to devices in waves, follow it, pause or abort it.

``watch`` follows a rollout until it reaches a final state (see
:mod:`edgelm_provisioning.rollout_watch`) and exits with the outcome: 0 when it completed,
3 when it ended failed or aborted (and, with ``--exit-on-halt``, 4 when it halted or was
paused and waits for the operator).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from edgelm_cli.groups import SuggestingGroup
from edgelm_provisioning.cli_values import (
    Duration,
    Share,
    check_model_ref,
    selector_from_options,
)
from edgelm_provisioning.control_client import ControlClient
from edgelm_provisioning.fleet_output import ROLLOUT_LIST_COLUMNS, rows_table
from edgelm_provisioning.operator_cli import (
    EXIT_ROLLOUT_HALTED,
    Operator,
    connection_options,
    err_console,
    out_console,
    page_options,
    page_query,
)
from edgelm_provisioning.rollout_view import (
    WAITING_FOR_OPERATOR,
    changes,
    exit_status,
    rollout_view,
)
from edgelm_provisioning.rollout_watch import FeedMode, RolloutWatcher, Snapshot, WatchSettings

#: Device rows a live view shows (failures and busy devices first); the rest are summed up.
LIVE_DEVICE_ROWS = 30


@click.group(cls=SuggestingGroup)
def rollouts() -> None:
    """Staged rollouts of a model to devices."""


@rollouts.command("create")
@click.option("--model", required=True, metavar="NAME@VERSION", help="The model to roll out.")
@click.option("--devices", metavar="A,B", help="These devices, by id.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Devices with all labels.")
@click.option("--class", "hardware_class", metavar="CLASS", help="Devices of a hardware class.")
@click.option("--all", "all_devices", is_flag=True, help="Every device of the fleet.")
@click.option("--canary", metavar="N|P%", help="A first wave of N devices or P% of them.")
@click.option("--waves", metavar="SIZES", help="Explicit wave sizes, e.g. 1,10,rest.")
@click.option(
    "--success-threshold",
    type=Share(),
    help="Share of a wave's devices that must succeed (0-1 or %). [server default: 1]",
)
@click.option(
    "--failure-threshold",
    type=Share(),
    help="Share of failures that fails a wave at once (0-1 or %). [server default: 0.2]",
)
@click.option(
    "--on-failure",
    type=click.Choice(["pause", "abort"]),
    help="What a failed wave does to the rollout. [server default: pause]",
)
@click.option(
    "--health-margin",
    type=Share(below_one=True),
    help="Gate waves on tokens/s and TTFT vs the previous model, e.g. 0.2. [default: off]",
)
@click.option(
    "--device-timeout",
    type=Duration(),
    help="An online device silent this long times out (90s, 30m, 2h). [server default: 30m]",
)
@click.option(
    "--pending-expiry",
    type=Duration(),
    help="An offline device still pending this long expires (e.g. 7d). [server default: 7d]",
)
@click.option(
    "--pause-between-waves",
    is_flag=True,
    default=None,
    help="Pause after each wave that passes; `rollouts resume` starts the next one.",
)
@connection_options
def create_cmd(
    model: str,
    devices: str | None,
    labels: tuple[str, ...],
    hardware_class: str | None,
    all_devices: bool,
    canary: str | None,
    waves: str | None,
    success_threshold: float | None,
    failure_threshold: float | None,
    on_failure: str | None,
    health_margin: float | None,
    device_timeout: int | None,
    pending_expiry: int | None,
    pause_between_waves: bool | None,
    control: str | None,
    token: str | None,
    fleet_dir: Path | None,
    as_json: bool,
) -> None:
    """Roll NAME@VERSION out to the devices selected, in waves; prints the rollout's id."""
    if canary is not None and waves is not None:
        raise click.UsageError("give --canary or --waves, not both")
    body: dict[str, Any] = {
        "model": check_model_ref(model),
        "selector": selector_from_options(
            devices=devices, labels=labels, hardware_class=hardware_class, all_devices=all_devices
        ),
    }
    optional = {
        "canary": canary,
        "waves": waves,
        "success_threshold": success_threshold,
        "failure_threshold": failure_threshold,
        "on_failure": on_failure,
        "health_margin": health_margin,
        "device_timeout_s": device_timeout,
        "pending_expiry_s": pending_expiry,
        "pause_between_waves": pause_between_waves,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    rollout = operator.post("/rollouts", body)
    if as_json:
        operator.emit(rollout, lambda: None)
        return
    click.echo(rollout.get("id"))  # alone on stdout: RO=$(edgelm fleet rollouts create ...)
    err_console.print(rollout_view(rollout, max_devices=LIVE_DEVICE_ROWS))
    err_console.print(f"follow it: edgelm fleet rollouts watch {rollout.get('id')}")


@rollouts.command("list")
@click.option("--state", help="Only rollouts in this state (running, completed, ...).")
@page_options
@connection_options
def list_cmd(
    state: str | None,
    limit: int,
    cursor: str | None,
    control: str | None,
    token: str | None,
    fleet_dir: Path | None,
    as_json: bool,
) -> None:
    """Rollouts, with how many devices are in each state."""
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    query = page_query(limit, cursor) + ([("state", state)] if state else [])
    page = operator.get("/rollouts", query)

    def human() -> None:
        out_console().print(rows_table(page.get("data", []), ROLLOUT_LIST_COLUMNS))
        if page.get("next_cursor"):
            err_console.print(f"more: --cursor {page['next_cursor']}")

    operator.emit(page, human)


@rollouts.command("show")
@click.argument("rollout_id", metavar="ID")
@connection_options
def show_cmd(
    rollout_id: str, control: str | None, token: str | None, fleet_dir: Path | None, as_json: bool
) -> None:
    """One rollout: its state, each wave's verdict, each device's state and reason."""
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    rollout = operator.get(f"/rollouts/{rollout_id}")
    operator.emit(rollout, lambda: out_console().print(rollout_view(rollout)))


def _operator_action(action: str, done: str, help_text: str) -> click.Command:
    """``pause``, ``resume`` and ``abort``: one POST each, answered with the rollout."""

    @click.argument("rollout_id", metavar="ID")
    @connection_options
    def command(
        rollout_id: str,
        control: str | None,
        token: str | None,
        fleet_dir: Path | None,
        as_json: bool,
    ) -> None:
        operator = Operator.connect(
            control=control, token=token, fleet_dir=fleet_dir, as_json=as_json
        )
        rollout = operator.post(f"/rollouts/{rollout_id}/{action}")
        operator.emit(
            rollout,
            lambda: err_console.print(
                f"rollout {rollout.get('id', rollout_id)} {done}: now {rollout.get('state')}"
            ),
        )

    return click.command(action, help=help_text)(command)


rollouts.add_command(
    _operator_action("pause", "paused", "Hold the rollout: no next wave starts until resume.")
)
rollouts.add_command(
    _operator_action(
        "resume",
        "resumed",
        "Go on with a paused rollout (after a failed wave: accept it and start the next).",
    )
)
rollouts.add_command(
    _operator_action(
        "abort",
        "aborted",
        "Stop the rollout: cancel devices not started and downloads in flight, and roll back "
        "devices that already switched to the new model.",
    )
)


@rollouts.command("watch")
@click.argument("rollout_id", metavar="ID")
@click.option(
    "--exit-on-halt",
    is_flag=True,
    help="Exit 4 when the rollout halts or is paused, instead of waiting for the operator.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.05),
    default=2.0,
    show_default=True,
    help="Seconds between reads when the event stream is not available.",
)
@connection_options
def watch_cmd(
    rollout_id: str,
    exit_on_halt: bool,
    poll_interval: float,
    control: str | None,
    token: str | None,
    fleet_dir: Path | None,
    as_json: bool,
) -> None:
    """Follow a rollout live until it ends: each wave's verdict, each device's state.

    Exits 0 when the rollout completed, 3 when it failed or was aborted; with
    --exit-on-halt, 4 when it halted or was paused. With --json, prints each new state of the
    rollout as one JSON line. Fed by the event stream, or by polling if that drops.
    """
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    settings = WatchSettings(poll_interval_s=poll_interval)

    def done(snapshot: Snapshot) -> bool:
        state = snapshot.get("state")
        return exit_status(snapshot) is not None or (exit_on_halt and state in WAITING_FOR_OPERATOR)

    display = _Display(as_json=as_json, live=not as_json and sys.stdout.isatty())

    async def follow(client: ControlClient) -> Snapshot:
        watcher = RolloutWatcher(client, rollout_id, display.show, settings)
        with display:
            return await watcher.run(done)

    final = operator.call(follow)
    status = exit_status(final)
    raise SystemExit(EXIT_ROLLOUT_HALTED if status is None else status)


class _Display:
    """Where snapshots go: a live rich view, lines of changes, or JSON lines."""

    def __init__(self, *, as_json: bool, live: bool) -> None:
        self.as_json = as_json
        self._live = Live(console=Console(), auto_refresh=False) if live else None
        self._last: Snapshot | None = None

    def __enter__(self) -> _Display:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def show(self, snapshot: Snapshot, mode: FeedMode) -> None:
        before, self._last = self._last, snapshot
        if self.as_json:
            if snapshot != before:
                click.echo(json.dumps(snapshot, separators=(",", ":")))
            return
        if self._live is not None:
            footer = {
                FeedMode.CONNECTING: "connecting to the event stream ...",
                FeedMode.STREAM: "live (event stream); Ctrl-C stops watching, not the rollout",
                FeedMode.POLLING: "event stream unavailable: polling",
            }[mode]
            view = rollout_view(snapshot, max_devices=LIVE_DEVICE_ROWS)
            self._live.update(Group(view, Text(footer, style="dim")), refresh=True)
            return
        for line in changes(before, snapshot):
            click.echo(line)
