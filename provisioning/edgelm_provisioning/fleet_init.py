"""``fleet-init``: a new fleet's keys, TUF repository, control-plane config and operator token.

Who holds what, and so who can do what (the trust model in one table):

=======================  ==========================  =========================================
file                     where it goes               what its holder can do
=======================  ==========================  =========================================
keys/root-0.pem          stays (offline)             replace every other key of the fleet
keys/targets-0.pem       stays (offline)             say which models exist (sign targets)
operator-token           stays                       call the control plane's REST API
control/keys/*.pem       the control-plane server    re-sign snapshot and timestamp; sign
                                                     desired states (which listed model runs)
control/tokens.json      the control-plane server    nothing: token hashes only
root.json                every device (in bundles)   nothing: public trust anchor
keys/fleet-ca.pem        stays (offline)             issue device, broker and control-plane
                                                     certificates (mutual TLS on the broker)
broker/server-key.pem    the broker                  be the broker to devices
control/tls/client-*     the control-plane server    connect to the broker as ``control``
control/tls/server-*     the control-plane server    be the control plane (HTTPS) to devices
=======================  ==========================  =========================================

The CA (:mod:`edgelm_provisioning.fleet_ca`) is made with the rest; a fleet made before it
existed gets one with ``edgelm provision ca-init``.

So whoever owns the control plane can choose among models the operator signed and hold back
updates, but cannot make a device run a model the targets key did not sign; whoever owns the
broker can do neither.

The fleet is built in a private staging directory beside ``DIR`` and renamed into place at the
end, so a failure (a full disk, an interrupt) leaves no half-made fleet that would refuse the
next attempt; and a ``DIR`` that already holds anything is refused, so no key is ever
overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from tuf.api.metadata import Root, Snapshot, Targets, Timestamp

from edgelm_protocol.repository.atomic_file import fsync_dir, write_atomic
from edgelm_protocol.repository.writer import RepositoryWriter, generate_key
from edgelm_provisioning.errors import FleetDirError, InvalidValue
from edgelm_provisioning.fleet_ca import create_ca
from edgelm_provisioning.fleet_dir import FleetConfig, FleetPaths, listen_address, serves_tls
from edgelm_provisioning.tokens import OPERATOR, TokenFile
from edgelm_provisioning.toml_file import dump_toml

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644


class Destination(StrEnum):
    """Where a file of the fleet directory is meant to be."""

    STAYS = "stays"  # on the operator's machine, never copied anywhere
    SERVER = "server"  # copied to the control-plane server (with control/)
    DEVICES = "devices"  # goes to devices, inside their enrollment bundles
    BROKER = "broker"  # goes to the MQTT broker (edgelm provision broker-config)


@dataclass(frozen=True)
class CreatedFile:
    path: str  # relative to the fleet directory
    what: str
    destination: Destination
    secret: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "what": self.what,
            "destination": str(self.destination),
            "secret": self.secret,
        }


@dataclass(frozen=True)
class FleetInitResult:
    root: Path
    config: FleetConfig
    files: tuple[CreatedFile, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "fleet_dir": str(self.root),
            "fleet": self.config.fleet,
            "control_url": self.config.control_url,
            "broker_url": self.config.broker_url,
            "repository_url": self.config.repository_url,
            "files": [f.as_dict() for f in self.files],
        }


_FILES = (
    CreatedFile("fleet.toml", "the fleet's name and URLs", Destination.STAYS, False),
    CreatedFile(
        "keys/root-0.pem", "TUF root key (replaces any other key)", Destination.STAYS, True
    ),
    CreatedFile("keys/targets-0.pem", "TUF targets key (signs models)", Destination.STAYS, True),
    CreatedFile("operator-token", "your bearer token for `edgelm fleet`", Destination.STAYS, True),
    CreatedFile("devices/", "inventory of issued devices (no secrets)", Destination.STAYS, False),
    CreatedFile("root.json", "the fleet's TUF root metadata", Destination.DEVICES, False),
    CreatedFile("control/control.toml", "the control plane's config", Destination.SERVER, False),
    CreatedFile(
        "control/tokens.json", "operator tokens, sha256 hashes only", Destination.SERVER, False
    ),
    CreatedFile(
        "control/repository/", "the TUF repository, signed metadata", Destination.SERVER, False
    ),
    CreatedFile(
        "control/keys/snapshot-0.pem", "TUF snapshot key (online)", Destination.SERVER, True
    ),
    CreatedFile(
        "control/keys/timestamp-0.pem", "TUF timestamp key (online)", Destination.SERVER, True
    ),
    CreatedFile(
        "control/keys/director.pem", "director key (signs desired states)", Destination.SERVER, True
    ),
)
CA_FILES = (
    CreatedFile(
        "keys/fleet-ca.pem", "fleet CA key (issues TLS identities)", Destination.STAYS, True
    ),
    CreatedFile(
        "tls/issued.json", "every certificate issued, and revocations", Destination.STAYS, False
    ),
    CreatedFile("tls/ca.pem", "fleet CA certificate (trust anchor)", Destination.DEVICES, False),
    CreatedFile("tls/crl.pem", "certificate revocation list", Destination.BROKER, False),
    CreatedFile("broker/server.pem", "the broker's TLS certificate", Destination.BROKER, False),
    CreatedFile("broker/server-key.pem", "the broker's TLS key", Destination.BROKER, True),
    CreatedFile(
        "control/tls/client.pem",
        "control plane's broker identity (CN control)",
        Destination.SERVER,
        False,
    ),
    CreatedFile(
        "control/tls/client-key.pem",
        "control plane's broker identity key",
        Destination.SERVER,
        True,
    ),
    CreatedFile("control/tls/ca.pem", "fleet CA certificate", Destination.SERVER, False),
    CreatedFile(
        "control/tls/server.pem",
        "control plane's HTTPS certificate (repository, API)",
        Destination.SERVER,
        False,
    ),
    CreatedFile(
        "control/tls/server-key.pem", "control plane's HTTPS key", Destination.SERVER, True
    ),
)


def default_fleet_name(root: Path) -> str:
    """The directory's name: the fleet id when --fleet is not given (if it is a valid id)."""
    return root.resolve().name


def init_fleet(
    root: Path,
    *,
    fleet: str | None,
    control_url: str,
    broker_url: str,
    now: int,
    sans: Iterable[str] | None = None,
) -> FleetInitResult:
    """Create a complete fleet directory at ``root``, or raise and leave nothing behind."""
    if isinstance(sans, str):
        raise TypeError("sans is a list of names, not one string")
    name = fleet if fleet is not None else default_fleet_name(root)
    try:
        config = FleetConfig(fleet=name, control_url=control_url, broker_url=broker_url)
    except InvalidValue as exc:
        if fleet is None and exc.param == "fleet":
            raise InvalidValue(
                "fleet",
                f"the directory name {name!r} is not a valid fleet id; give --fleet NAME",
                hint="a fleet id is 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit",
            ) from exc
        raise
    _refuse_taken(root)
    parent = root.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.fleet-init-", dir=parent))
    try:
        _build(FleetPaths(staging), config, now)
        create_ca(staging, config, now=now, sans=sans)
        try:
            os.rename(staging, root)  # replaces an empty directory, never a non-empty one
        except OSError as exc:
            _refuse_taken(root)
            raise FleetDirError(
                "fleet-dir-unusable",
                root,
                f"cannot move the new fleet into {root}: {exc.strerror}",
                hint="give a DIR that does not exist yet, on a local file system",
            ) from exc
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FleetInitResult(root, config, _FILES + CA_FILES)


def _refuse_taken(root: Path) -> None:
    paths = FleetPaths(root)
    if paths.holds_fleet():
        raise FleetDirError(
            "fleet-exists",
            root,
            f"{root} already holds a fleet; refusing to generate keys over it",
            hint="keys cannot be regenerated without re-enrolling every device; "
            "choose another DIR for a new fleet",
        )
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FleetDirError(
            "fleet-dir-not-empty",
            root,
            f"{root} exists and is not an empty directory",
            hint="give a DIR that does not exist yet (it is created) or is empty",
        )


def _private_dir(path: Path) -> None:
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR)  # mkdir's mode is filtered by the umask; this one is not


def _build(paths: FleetPaths, config: FleetConfig, now: int) -> None:
    paths.root.chmod(PRIVATE_DIR)
    for directory in (paths.keys_dir, paths.control_dir, paths.control_keys_dir, paths.devices_dir):
        _private_dir(directory)
    RepositoryWriter.create(
        paths.repository_dir,
        paths.control_keys_dir,
        key_dirs={
            Root.type: paths.keys_dir,
            Targets.type: paths.keys_dir,
            Snapshot.type: paths.control_keys_dir,
            Timestamp.type: paths.control_keys_dir,
        },
    )
    root_bytes = (paths.repository_dir / "metadata" / "1.root.json").read_bytes()
    write_atomic(paths.root_json, root_bytes, mode=PUBLIC_FILE)
    generate_key(paths.director_key)
    issued = TokenFile(paths.tokens_json).create(OPERATOR, now=now)
    write_atomic(paths.operator_token, (issued.token + "\n").encode(), mode=PRIVATE_FILE)
    write_atomic(paths.control_toml, control_toml(config).encode(), mode=PRIVATE_FILE)
    write_atomic(paths.fleet_toml, config.to_toml().encode(), mode=PUBLIC_FILE)


TLS_TOML_KEYS = {
    "broker_ca": "tls/ca.pem",
    "broker_cert": "tls/client.pem",
    "broker_key": "tls/client-key.pem",
}
_TLS_COMMENT = "mutual TLS with the broker (mqtts://): the fleet CA and the identity `control`"
HTTPS_TOML_KEYS = {"http_tls_cert": "tls/server.pem", "http_tls_key": "tls/server-key.pem"}


def control_toml(config: FleetConfig) -> str:
    """The control plane's configuration; its paths are relative to the file's folder."""
    listen = listen_address(config.control_url)
    return dump_toml(
        {
            "fleet": config.fleet,
            "http": listen,
            "public_url": config.control_url,
            "db": "sqlite:///control.db",
            "broker_url": config.broker_url,
            "repository_dir": "repository",
            "keys_dir": "keys",
            "tokens_file": "tokens.json",
            **TLS_TOML_KEYS,
            **(HTTPS_TOML_KEYS if serves_tls(config.control_url) else {}),
        },
        comments={
            "fleet": "written by `edgelm provision fleet-init`; relative paths are relative "
            "to this file's folder",
            "http": "HOST:PORT to listen on. For a public URL without a port a reverse proxy "
            "is assumed in front (for https://, TLS ends there)",
            "public_url": "how devices reach this server; the repository is public_url + "
            "/repository",
            "db": "or postgresql://user@host/db",
            "broker_ca": _TLS_COMMENT,
            "http_tls_cert": "HTTPS with the certificate the fleet CA issued for public_url's host",
        },
    )


def add_ca(root: Path, config: FleetConfig, *, now: int, sans: list[str] | None) -> FleetInitResult:
    """``ca-init``: give a fleet made before the CA existed its CA, broker and control identities.

    control.toml gets the three ``broker_*`` keys appended (if it holds none of them already).
    """
    create_ca(root, config, now=now, sans=sans)
    paths = FleetPaths(root)
    if paths.control_toml.exists():
        text = paths.control_toml.read_text()
        if not any(line.startswith(tuple(TLS_TOML_KEYS)) for line in text.splitlines()):
            extra = dump_toml(dict(TLS_TOML_KEYS), comments={"broker_ca": _TLS_COMMENT})
            sep = "" if text.endswith("\n") else "\n"
            write_atomic(paths.control_toml, (text + sep + extra).encode(), mode=PRIVATE_FILE)
    return FleetInitResult(root, config, CA_FILES)
