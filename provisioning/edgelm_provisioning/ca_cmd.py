"""``edgelm provision ca-rotate`` and ``edgelm provision control-identity``: the fleet CA's
lifecycle and the control plane's broker identities. Registered on the ``provision`` group by
:mod:`edgelm_provisioning.provision_cmd`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from edgelm_provisioning.ca_rotation import Rotation, finish_rotation, start_rotation
from edgelm_provisioning.control_identity import (
    issue_control_identity,
    replica_cn,
    revoke_control_identity,
)
from edgelm_provisioning.fleet_ca import SERVER_DAYS, CaPaths
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.operator_cli import emit, err_console, json_option, translated

_FLEET_DIR = click.option(
    "--fleet-dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The fleet directory made by `edgelm provision fleet-init`.",
)


@click.command("ca-rotate")
@_FLEET_DIR
@click.option(
    "--finish",
    is_flag=True,
    help="End the overlap: drop the previous CA (its key is deleted) from every trust bundle.",
)
@click.option(
    "--force",
    is_flag=True,
    help="With --finish: even if some devices still hold a certificate from the previous CA "
    "only (they are locked out).",
)
@click.option(
    "--san",
    "sans",
    multiple=True,
    metavar="NAME|IP",
    help="A name or address for the new broker certificate (repeatable). "
    "[default: the current broker certificate's]",
)
@json_option
@translated
def ca_rotate_cmd(
    fleet_dir: Path, finish: bool, force: bool, sans: tuple[str, ...], as_json: bool
) -> None:
    """Rotate the fleet CA with an overlap period: a new CA beside the old one, both accepted by
    the broker until `--finish`.

    Starting writes the new CA, a cross-certificate from the old one, new broker and
    control-plane certificates and identities, the trust bundle and both CRLs. Then:
    broker-config --force and restart the broker; copy control/ to the server; then reissue
    every device (`provision device ID --reissue`) and enroll the new bundles, which trust the
    new CA alone (the device drops the old one); finally
    `ca-rotate --finish`, broker-config --force and restart the broker again.
    """
    fleet = FleetDir.open(fleet_dir)
    now = int(time.time())
    if finish:
        rotation = finish_rotation(fleet.paths.root, now=now, force=force)
    else:
        rotation = start_rotation(
            fleet.paths.root, fleet.config, now=now, sans=list(sans) if sans else None
        )
    emit(rotation.as_dict(), as_json=as_json, human=lambda: _show_rotation(rotation, fleet_dir))


def _show_rotation(rotation: Rotation, fleet_dir: Path) -> None:
    if rotation.phase == "overlap":
        err_console.print(
            f"CA rotation started: new CA [bold]{rotation.ca[:16]}[/], previous "
            f"{(rotation.previous_ca or '')[:16]} accepted by the broker until --finish"
        )
    else:
        err_console.print(
            f"CA rotation finished: CA [bold]{rotation.ca[:16]}[/] alone; the previous CA's "
            "key is deleted"
        )
    for path in rotation.written:
        err_console.print(f"  wrote   {path}")
    for path in rotation.removed:
        err_console.print(f"  removed {path}")
    if rotation.devices_on_previous_ca:
        err_console.print(
            f"  {len(rotation.devices_on_previous_ca)} device(s) on the previous CA only: "
            + ", ".join(rotation.devices_on_previous_ca[:10])
        )
    err_console.print(
        "\n[bold]next[/]\n"
        f"  edgelm provision broker-config --fleet-dir {fleet_dir} --out BROKER_DIR --force, "
        "then restart the broker\n"
        "  copy control/ to the control-plane server(s) and restart them"
    )
    if rotation.phase == "overlap":
        err_console.print(
            f"  edgelm provision device ID --fleet-dir {fleet_dir} --reissue --out ID.json "
            "for every device, then edgelm agent enroll on each (it then trusts the new CA "
            "alone)\n"
            f"  edgelm provision ca-rotate --finish --fleet-dir {fleet_dir}"
        )


@click.command("control-identity")
@click.argument("name")
@_FLEET_DIR
@click.option(
    "--reissue", is_flag=True, help="A new key and certificate; the earlier ones are revoked."
)
@click.option("--revoke", is_flag=True, help="Revoke the replica's identity instead.")
@click.option(
    "--cert-days",
    type=click.IntRange(1, 3650),
    default=SERVER_DAYS,
    show_default=True,
    help="How long the certificate is valid.",
)
@json_option
@translated
def control_identity_cmd(
    name: str, fleet_dir: Path, reissue: bool, revoke: bool, cert_days: int, as_json: bool
) -> None:
    """Issue control-plane replica NAME its own broker identity, CN control:NAME (no device
    id can take it), under control/tls/replicas/NAME/.

    Replicas that share the identity `control` share one client id on the broker, which
    disconnects one whenever the other connects. Set `replica = "NAME"`, `broker_cert` and
    `broker_key` in that replica's control.toml (printed here), then run broker-config
    --force: the ACL gives every identity the control rights.
    """
    fleet = FleetDir.open(fleet_dir)
    now = int(time.time())
    control_dir = fleet.paths.control_dir
    if revoke:
        serials = revoke_control_identity(fleet.paths.root, name, now=now)
        crl = CaPaths(fleet.paths.root).crl
        data = {"cn": replica_cn(name), "revoked_serials": serials, "crl": str(crl)}
        emit(
            data,
            as_json=as_json,
            human=lambda: err_console.print(
                f"revoked {len(serials)} certificate(s) of [bold]{replica_cn(name)}[/]; run "
                "broker-config --force (the CRL and the ACL change) and restart the broker"
            ),
        )
        return
    identity = issue_control_identity(
        fleet.paths.root, name, now=now, days=cert_days, reissue=reissue
    )
    data = {"replica": name, **identity.as_dict(control_dir)}

    def human() -> None:
        err_console.print(f"issued [bold]{identity.cn}[/] (serial {identity.serial})")
        err_console.print(f"  key {identity.key} [red](secret; to that replica only)[/]")
        err_console.print("  in that replica's control.toml:")
        err_console.print(f'    replica = "{name}"')
        err_console.print(f'    broker_cert = "{data["broker_cert"]}"')
        err_console.print(f'    broker_key = "{data["broker_key"]}"')
        err_console.print("  then: edgelm provision broker-config --force, and restart the broker")

    emit(data, as_json=as_json, human=human)
