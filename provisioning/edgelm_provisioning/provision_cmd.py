"""``edgelm provision``: a fleet's keys, its devices' enrollment bundles, operator tokens.

Everything here works offline, on the operator's machine, on the fleet directory. What leaves
that machine: ``DIR/control/`` goes to the control-plane server as it is, and each bundle goes
to its one device. What never does: ``DIR/keys/`` (the offline root and targets keys) and
``DIR/operator-token``. Exit statuses are those of :mod:`edgelm_provisioning.operator_cli`.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from edgelm_cli.groups import SuggestingGroup
from edgelm_protocol.repository.atomic_file import write_atomic
from edgelm_provisioning.broker_config import copy_crl, write_broker_config
from edgelm_provisioning.ca_cmd import ca_rotate_cmd, control_identity_cmd
from edgelm_provisioning.control_client import ControlClient
from edgelm_provisioning.enrollment import (
    HARDWARE_CLASSES,
    checked_device_id,
    issue_device,
    labels_from_cli,
)
from edgelm_provisioning.errors import NotIssued, ProvisioningError
from edgelm_provisioning.fleet_ca import DEFAULT_CLIENT_DAYS, FleetCa, revoke_device
from edgelm_provisioning.fleet_cmd import revocation_summary
from edgelm_provisioning.fleet_dir import DEFAULT_BROKER_URL, DEFAULT_CONTROL_URL, FleetDir
from edgelm_provisioning.fleet_init import Destination, FleetInitResult, add_ca, init_fleet
from edgelm_provisioning.key_rotation_cmd import rotate_keys_cmd
from edgelm_provisioning.operator_cli import emit, err_console, json_option, out_console, translated
from edgelm_provisioning.operator_tls import fleet_ssl_context
from edgelm_provisioning.settings import resolve_settings
from edgelm_provisioning.tokens import OPERATOR, TokenFile

_FLEET_DIR = click.option(
    "--fleet-dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The fleet directory made by `edgelm provision fleet-init`.",
)
_HEADINGS = {
    Destination.STAYS: "stays on this machine (back the secrets up offline; never copy them "
    "anywhere else):",
    Destination.SERVER: "copy to the control-plane server, as it is (DIR/control/):",
    Destination.DEVICES: "goes to devices, inside their enrollment bundles:",
    Destination.BROKER: "goes to the MQTT broker (edgelm provision broker-config gathers it):",
}
_SAN = click.option(
    "--san",
    "sans",
    multiple=True,
    metavar="NAME|IP",
    help="A name or address of the broker for its TLS certificate (repeatable). "
    "[default: localhost, 127.0.0.1 and the broker URL's host]",
)


@click.group(cls=SuggestingGroup)
def provision() -> None:
    """Fleet keys, device enrollment bundles and operator tokens (works offline)."""


@provision.command("fleet-init")
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--fleet", metavar="NAME", help="The fleet's id. [default: DIR's name]")
@click.option(
    "--control-url",
    default=DEFAULT_CONTROL_URL,
    show_default=True,
    help="How devices and operators reach the control plane.",
)
@click.option(
    "--broker-url",
    default=DEFAULT_BROKER_URL,
    show_default=True,
    help="The MQTT broker devices connect to.",
)
@_SAN
@json_option
@translated
def fleet_init_cmd(
    directory: Path,
    fleet: str | None,
    control_url: str,
    broker_url: str,
    sans: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create a new fleet in DIR: keys, TUF repository, fleet CA (broker and control-plane
    TLS identities), control-plane config, operator token.

    DIR must not exist yet, or be empty: keys are never generated over an existing fleet.
    """
    result = init_fleet(
        directory,
        fleet=fleet,
        control_url=control_url,
        broker_url=broker_url,
        now=int(time.time()),
        sans=list(sans) if sans else None,
    )
    emit(result.as_dict(), as_json=as_json, human=lambda: _show_fleet(result))


@provision.command("ca-init")
@_FLEET_DIR
@_SAN
@json_option
@translated
def ca_init_cmd(fleet_dir: Path, sans: tuple[str, ...], as_json: bool) -> None:
    """Give a fleet made before the fleet CA existed its CA, broker certificate and the
    control plane's broker identity (fleet-init does this for new fleets).

    Adds broker_ca, broker_cert and broker_key to control/control.toml. Devices issued before
    have no certificate: reissue them (`edgelm provision device ID --reissue`).
    """
    fleet = FleetDir.open(fleet_dir)
    result = add_ca(
        fleet.paths.root, fleet.config, now=int(time.time()), sans=list(sans) if sans else None
    )
    emit(result.as_dict(), as_json=as_json, human=lambda: _show_fleet(result))


def _show_fleet(result: FleetInitResult) -> None:
    where = result.root
    err_console.print(f"fleet [bold]{result.config.fleet}[/] in {where}")
    err_console.print(f"  control plane {result.config.control_url}")
    err_console.print(f"  broker        {result.config.broker_url}")
    for destination, heading in _HEADINGS.items():
        err_console.print(f"\n[bold]{heading}[/]")
        for f in result.files:
            if f.destination is destination:
                secret = "  [red](secret)[/]" if f.secret else ""
                err_console.print(f"  {f.path:<30} {f.what}{secret}")
        if destination is Destination.DEVICES:
            err_console.print(
                f"  {'ID.json bundles':<30} one per device (edgelm provision device), each to "
                "that device only  [red](secret)[/]"
            )
    err_console.print(
        "\n[bold]next[/]\n"
        f"  edgelm provision device ID --fleet-dir {where} --class pi5 --out ID.json\n"
        f"  edgelm control run --config {where}/control/control.toml   (on the server)\n"
        f"  edgelm fleet devices list --fleet-dir {where}"
    )


@provision.command("device")
@click.argument("device_id", metavar="ID")
@_FLEET_DIR
@click.option(
    "--class",
    "hardware_class",
    type=click.Choice(HARDWARE_CLASSES),
    help="The device's hardware class (required for a new device; kept on --reissue).",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="A label rollouts can select by (repeatable; replaces all labels on --reissue).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the enrollment bundle (mode 0600).",
)
@click.option(
    "--reissue",
    is_flag=True,
    help="Issue an id again: a new bundle with new broker credentials (and a new "
    "certificate; the earlier ones are revoked).",
)
@click.option(
    "--cert-days",
    type=click.IntRange(1, 3650),
    default=DEFAULT_CLIENT_DAYS,
    show_default=True,
    help="How long the device's TLS certificate is valid.",
)
@click.option(
    "--csr",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Sign this certificate signing request, made on the device with `edgelm agent "
    "enroll --csr`: the bundle then carries the certificate but no key.",
)
@json_option
@translated
def device_cmd(
    device_id: str,
    fleet_dir: Path,
    hardware_class: str | None,
    labels: tuple[str, ...],
    out: Path,
    reissue: bool,
    cert_days: int,
    csr: Path | None,
    as_json: bool,
) -> None:
    """Issue device ID: write its enrollment bundle (with its broker credentials) to --out.

    The bundle holds the device's broker password: give it to that device only. The
    inventory record DIR/devices/ID.json holds no secret. With --csr the device's TLS key
    never leaves it: the request's key is certified (CN ID, clientAuth only), nothing else
    the request asks for.
    """
    fleet = FleetDir.open(fleet_dir)
    issued = issue_device(
        fleet,
        device_id,
        hardware_class=hardware_class,
        labels=labels_from_cli(labels) if labels else None,
        out=out,
        reissue=reissue,
        now=int(time.time()),
        cert_days=cert_days,
        csr=None if csr is None else csr.read_bytes(),
    )

    def human() -> None:
        record = issued.record
        label_text = ", ".join(f"{k}={v}" for k, v in record.labels.items())
        verb = "reissued" if issued.reissued else "issued"
        err_console.print(
            f"{verb} [bold]{record.id}[/] ({record.hardware_class}"
            f"{', ' + label_text if label_text else ''}) in fleet {fleet.config.fleet}"
        )
        err_console.print(
            f"  bundle {out} [red](secret: the device's broker password; mode 0600)[/]"
        )
        if issued.reissued:
            err_console.print("  the previous bundle's credentials are replaced")
        if issued.request is not None:
            ignored = ", ".join(issued.request.ignored_extensions)
            err_console.print("  certificate for the device's own key (no key in the bundle)")
            if ignored:
                err_console.print(f"  extensions the request asked for, not granted: {ignored}")
        err_console.print(f"  on the device: edgelm agent enroll {out.name} --state-dir DIR")

    emit(issued.as_dict(), as_json=as_json, human=human)


@provision.command("broker-config")
@_FLEET_DIR
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The folder to write mosquitto.conf, acl, certificates, crl.pem, emqx-acl.conf into.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="The TLS listener's port. [default: the mqtts:// broker URL's port, else 8883]",
)
@click.option("--bind", metavar="ADDRESS", help="Listen on this address only. [default: all]")
@click.option(
    "--install-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where the folder will be on the broker host (the paths in mosquitto.conf). "
    "[default: --out]",
)
@click.option("--force", is_flag=True, help="Rewrite a configuration written before.")
@json_option
@translated
def broker_config_cmd(
    fleet_dir: Path,
    out: Path,
    port: int | None,
    bind: str | None,
    install_dir: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write a Mosquitto configuration for the fleet: a TLS listener that requires a
    certificate from the fleet CA, per-device ACL patterns, the CRL, persistence; and the same
    ACL as EMQX rules (emqx-acl.conf)."""
    fleet = FleetDir.open(fleet_dir)
    written = write_broker_config(
        fleet,
        out,
        port=port,
        bind=bind,
        install_dir=install_dir,
        now=int(time.time()),
        force=force,
    )

    def human() -> None:
        err_console.print(
            f"wrote a Mosquitto configuration for fleet {fleet.config.fleet} to {out}"
        )
        err_console.print(f"  TLS listener on port {written.port}; server-key.pem is secret")
        err_console.print(f"  run: mosquitto -c {(install_dir or out).absolute()}/mosquitto.conf")

    emit(written.as_dict(), as_json=as_json, human=human)


@provision.command("revoke")
@click.argument("device_id", metavar="ID")
@_FLEET_DIR
@click.option(
    "--broker-dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="Also write the new CRL into this folder made by `broker-config`.",
)
@click.option("--reason", metavar="TEXT", help="Why, for the control plane's record.")
@click.option(
    "--control",
    metavar="URL",
    help="The control plane to tell. [default: $EDGELM_CONTROL_URL, else fleet.toml's control_url]",
)
@click.option(
    "--token",
    metavar="TOKEN",
    help="Operator bearer token. [default: $EDGELM_CONTROL_TOKEN, else DIR/operator-token]",
)
@json_option
@translated
def revoke_cmd(
    device_id: str,
    fleet_dir: Path,
    broker_dir: Path | None,
    reason: str | None,
    control: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Revoke device ID: add its certificates to the fleet's CRL (DIR/tls/crl.pem), then tell
    the control plane, which refuses everything the device sends from then on (what the broker
    queued before too), takes it out of its rollouts, cancels its remote jobs and deletes its
    retained desired state.

    Copy the CRL to the broker (or give --broker-dir) and send Mosquitto SIGHUP: from then on
    the broker refuses the device's TLS handshake. When the control plane cannot be reached,
    the CRL is still written and the command to run later is printed (exit status 0; with
    --json, control_plane.revoked is false). Running it again for a revoked device tells the
    control plane again. A revoked id never comes back: enroll the hardware under a new id.
    """
    fleet = FleetDir.open(fleet_dir)
    device_id = checked_device_id(device_id)
    serials, crl = _revoke_certificates(fleet, device_id, now=int(time.time()))
    copied = copy_crl(crl, broker_dir) if broker_dir is not None else None
    told = _tell_control_plane(
        fleet, device_id, reason=reason, control=control, token=token, fleet_dir=fleet_dir
    )
    data = {
        "device": device_id,
        "revoked_serials": serials,
        "crl": str(crl),
        "broker_crl": None if copied is None else str(copied),
        "control_plane": told,
    }

    def human() -> None:
        if serials:
            err_console.print(f"revoked {len(serials)} certificate(s) of [bold]{device_id}[/]")
        else:
            err_console.print(f"the certificates of [bold]{device_id}[/] were revoked before")
        err_console.print(f"  CRL {copied or crl}")
        err_console.print("  then reload the broker: kill -HUP <mosquitto pid>")
        if told["revoked"]:
            err_console.print(f"  {revocation_summary(told['answer'])}")
            return
        err_console.print(
            f"  [yellow]the control plane was not told[/] ({told['error']['message']}); "
            "until it is, it stores what the device sent. Once it is up, run:"
        )
        click.echo(f"    {told['command']}", err=True)  # unwrapped, to copy as it is

    emit(data, as_json=as_json, human=human)


def _revoke_certificates(fleet: FleetDir, device_id: str, *, now: int) -> tuple[list[str], Path]:
    """Revoke the device's certificates; for a device whose certificates are all revoked
    already (a second run, say after the control plane was away), none and the CRL."""
    try:
        return revoke_device(fleet.paths.root, device_id, now=now)
    except NotIssued:
        ca = FleetCa.load(fleet.paths.root)
        if any(i.get("cn") == device_id and i.get("revoked_at") for i in ca.register()):
            return [], ca.paths.crl
        raise


def _tell_control_plane(
    fleet: FleetDir,
    device_id: str,
    *,
    reason: str | None,
    control: str | None,
    token: str | None,
    fleet_dir: Path,
) -> dict[str, Any]:
    """Revoke the device in the control plane; when that fails, what failed and the
    ``edgelm fleet devices revoke`` command that does it later (never with the token)."""
    command = ["edgelm", "fleet", "devices", "revoke", device_id]
    command += ["--fleet-dir", str(fleet_dir.absolute())]
    if reason is not None:
        command += ["--reason", reason]
    if control is not None:
        command += ["--control", control]
    url: str | None = None
    try:
        settings = resolve_settings(control=control, token=token, fleet_dir=fleet.paths.root)
        url = settings.control_url

        async def call() -> Any:
            async with ControlClient(
                settings.control_url,
                settings.token,
                ssl_context=fleet_ssl_context(fleet.paths.root),
            ) as client:
                return await client.revoke_device(device_id, reason=reason)

        answer = asyncio.run(call())
    except ProvisioningError as exc:
        return {
            "revoked": False,
            "url": url,
            "error": {"reference": exc.reference, "message": exc.message},
            "command": shlex.join(command),
        }
    return {"revoked": True, "url": url, "answer": answer}


provision.add_command(ca_rotate_cmd)
provision.add_command(control_identity_cmd)
provision.add_command(rotate_keys_cmd)


@provision.group("token", cls=SuggestingGroup)
def token() -> None:
    """Operator tokens for the control plane's REST API (stored hashed)."""


@token.command("create")
@click.argument("name")
@_FLEET_DIR
@json_option
@translated
def token_create_cmd(name: str, fleet_dir: Path, as_json: bool) -> None:
    """Make a token NAME; print it once (only its sha256 is kept, in control/tokens.json).

    The token named `operator` is also written to DIR/operator-token (0600), where
    `edgelm fleet` finds it. Copy control/tokens.json to the server and restart the control
    plane for a change to take effect.
    """
    fleet = FleetDir.open(fleet_dir)
    issued = TokenFile(fleet.paths.tokens_json).create(name, now=int(time.time()))
    if name == OPERATOR:
        write_atomic(fleet.paths.operator_token, (issued.token + "\n").encode(), mode=0o600)
    data = {**issued.entry.as_dict(), "token": issued.token}
    if as_json:
        emit(data, as_json=True, human=lambda: None)
        return
    click.echo(issued.token)  # alone on stdout, so that TOKEN=$(edgelm provision token ...) works
    err_console.print(
        f"token [bold]{name}[/] created; it is shown this once. Copy "
        f"{fleet.paths.tokens_json} to the server and restart the control plane."
    )


@token.command("revoke")
@click.argument("name")
@_FLEET_DIR
@json_option
@translated
def token_revoke_cmd(name: str, fleet_dir: Path, as_json: bool) -> None:
    """Revoke token NAME (revoking `operator` also removes DIR/operator-token)."""
    fleet = FleetDir.open(fleet_dir)
    entry = TokenFile(fleet.paths.tokens_json).revoke(name)
    if name == OPERATOR:
        fleet.paths.operator_token.unlink(missing_ok=True)
    emit(
        {"revoked": entry.as_dict()},
        as_json=as_json,
        human=lambda: err_console.print(
            f"revoked token [bold]{name}[/]. Copy {fleet.paths.tokens_json} to the server and "
            "restart the control plane."
        ),
    )


@token.command("list")
@_FLEET_DIR
@json_option
@translated
def token_list_cmd(fleet_dir: Path, as_json: bool) -> None:
    """Token names and when they were made (never the tokens: only hashes are kept)."""
    fleet = FleetDir.open(fleet_dir)
    entries = TokenFile(fleet.paths.tokens_json).entries()

    def human() -> None:
        table = Table("name", "created", "sha256")
        for e in entries:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.created_at))
            table.add_row(e.name, f"{created} UTC", e.sha256[:12])
        out_console().print(table)

    emit({"tokens": [e.as_dict() for e in entries]}, as_json=as_json, human=human)
