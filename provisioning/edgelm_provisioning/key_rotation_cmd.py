"""``edgelm provision rotate-keys`` (offline) and ``edgelm fleet keys publish`` (online).

The two halves of a key rotation; what each writes and why is in
:mod:`edgelm_provisioning.fleet_keys`, the rules in :mod:`edgelm_provisioning.key_rotation`.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import click

from edgelm_cli.groups import SuggestingGroup
from edgelm_provisioning.errors import MissingSetting
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_keys import Rotation, check_published, publish, rotate
from edgelm_provisioning.key_rotation import ROTATABLE_ROLES
from edgelm_provisioning.operator_cli import (
    Operator,
    connection_options,
    emit,
    err_console,
    json_option,
    translated,
)
from edgelm_provisioning.repository_check import verify_repository


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@click.command("rotate-keys")
@click.option("--role", required=True, type=click.Choice(ROTATABLE_ROLES), help="Which key.")
@click.option(
    "--fleet-dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The fleet directory made by `edgelm provision fleet-init`.",
)
@json_option
@translated
def rotate_keys_cmd(role: str, fleet_dir: Path, as_json: bool) -> None:
    """Make a new ROLE key and the next root version, signed by the current root keys (and
    the new ones for --role root). Works offline; nothing is published until
    `edgelm fleet keys publish`. Old keys are kept: remove them once the root is published.
    """
    fleet = FleetDir.open(fleet_dir)
    rotation = rotate(fleet, role, now=_now())
    emit(rotation.as_dict(), as_json=as_json, human=lambda: _show_rotation(fleet, rotation))


def _show_rotation(fleet: FleetDir, rotation: Rotation) -> None:
    err_console.print(f"root v{rotation.root_version} signed: {rotation.root_file}")
    for path in rotation.new_keys:
        err_console.print(f"  new {rotation.role} key  {path}  [red](secret)[/]")
    if rotation.role == "director":
        err_console.print(
            "\n[bold]next[/]\n  copy the new director key into the control plane's keys_dir "
            "(it is there already if the server runs DIR/control as it is), then"
        )
    else:
        err_console.print("\n[bold]next[/]")
    err_console.print(f"  edgelm fleet keys publish --fleet-dir {fleet.paths.root}")


@click.group("keys", cls=SuggestingGroup)
def keys() -> None:
    """The fleet's signing keys: publish rotated roots to the control plane."""


@keys.command("publish")
@connection_options
def publish_cmd(
    control: str | None, token: str | None, fleet_dir: Path | None, as_json: bool
) -> None:
    """Publish every root version `edgelm provision rotate-keys` signed that the control plane
    lacks, in order, with the targets re-signed by the new targets key when it changed.
    Devices are told at once and walk to the new root.
    """
    if fleet_dir is None:
        raise MissingSetting(
            "fleet_dir", "keys publish needs --fleet-dir: the roots and keys are there"
        )
    operator = Operator.connect(control=control, token=token, fleet_dir=fleet_dir, as_json=as_json)
    fleet = operator.fleet
    assert fleet is not None
    url = operator.settings.control_url
    verified = verify_repository(fleet.paths, url)

    def post(body: dict[str, Any]) -> Any:
        return operator.post("/repository/root", body)

    published = publish(fleet, verified, post, now=_now())
    if published.answers:
        check_published(verify_repository(fleet.paths, url), published.root_version)

    def human() -> None:
        if not published.answers:
            err_console.print(f"nothing to publish: the control plane is at root "
                              f"v{published.root_version}")  # fmt: skip
            return
        for answer in published.answers:
            resigned = (
                f", targets re-signed as v{answer['targets_version']}"
                if answer.get("targets_resigned")
                else ""
            )
            err_console.print(f"published root v{answer['root_version']}{resigned}")
        err_console.print(
            f"DIR/root.json is now root v{published.root_version} (new enrollment bundles "
            "carry it); remove rotated-out keys once you no longer need them"
        )

    operator.emit(published.as_dict(), human)
