"""The control plane's broker identities: ``control``, and one per replica.

Mosquitto makes the certificate's CN the user name (``use_identity_as_username``) and the
user name the client id (``use_username_as_clientid``). Two replicas sharing the one identity
``control`` therefore share one client id, and the broker closes the older connection each
time the other connects: they kick each other off for ever. So each replica gets its own
certificate, with CN ``control:NAME``:

* ``:`` is outside the device-id alphabet (:data:`edgelm_protocol.ids.ID_PATTERN`), so no
  device id can ever equal a replica's CN, and ``provision device`` cannot issue one;
* ``NAME`` is a replica name (``[A-Za-z0-9][A-Za-z0-9._-]{0,31}``, the control plane's
  ``replica`` setting), so the CN holds no ``+``, ``#``, ``/`` or ``$``: substituted into an
  ACL pattern (``%u``) it cannot reach another topic (the CVE-2017-7650 class stays closed);
* the ACL (:mod:`edgelm_provisioning.broker_config`) gives every identity listed by
  :func:`control_identities` the control rights, so regenerate the broker configuration after
  issuing or revoking one.

``control`` itself stays, for fleets with one control plane and for those made before.
Files: ``control/tls/client.pem`` and ``client-key.pem`` for ``control``;
``control/tls/replicas/NAME/client.pem`` and ``client-key.pem`` (0600) for a replica.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm_protocol.repository.atomic_file import write_atomic
from edgelm_provisioning.errors import AlreadyIssued, InvalidValue, NotIssued
from edgelm_provisioning.fleet_ca import (
    CONTROL_CN,
    KIND_CONTROL,
    SERVER_DAYS,
    FleetCa,
    cert_pem,
    check_days,
    key_pem,
    new_key,
)

REPLICA_CN_SEPARATOR = ":"
#: The control plane's ``replica`` setting accepts the same names (restated: provisioning
#: does not import the control plane).
REPLICA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


def replica_cn(name: str) -> str:
    """``control:NAME``: a CN no device id can take (``:`` is not in their alphabet)."""
    if not isinstance(name, str) or not REPLICA_NAME.fullmatch(name):
        raise InvalidValue(
            "name",
            f"a replica name is 1-32 of A-Z a-z 0-9 . _ - starting with a letter or digit, "
            f"got {name!r}",
            hint="use the control plane's `replica` setting for it",
        )
    return f"{CONTROL_CN}{REPLICA_CN_SEPARATOR}{name}"


@dataclass(frozen=True)
class ControlIdentity:
    """One control identity written to the fleet directory."""

    cn: str
    cert: Path
    key: Path
    serial: str
    revoked: tuple[str, ...] = ()

    def as_dict(self, control_dir: Path) -> dict[str, Any]:
        """With the paths as control.toml takes them (relative to ``control/``)."""
        return {
            "cn": self.cn,
            "serial": self.serial,
            "broker_cert": str(self.cert.relative_to(control_dir)),
            "broker_key": str(self.key.relative_to(control_dir)),
            "revoked_serials": list(self.revoked),
        }


def identity_files(ca: FleetCa, cn: str) -> tuple[Path, Path]:
    """Where the certificate and key of control identity ``cn`` are written."""
    if cn == CONTROL_CN:
        return ca.paths.control_cert, ca.paths.control_key
    folder = ca.paths.replica_dir(cn.removeprefix(CONTROL_CN + REPLICA_CN_SEPARATOR))
    return folder / "client.pem", folder / "client-key.pem"


def write_control_identity(
    ca: FleetCa, cn: str, *, now: int, days: int = SERVER_DAYS
) -> ControlIdentity:
    """Issue ``cn`` a new key and client certificate and write both (the key 0600)."""
    cert_path, key_path = identity_files(ca, cn)
    for folder in (key_path.parent.parent, key_path.parent):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = new_key()
    cert = ca.issue_client(cn, kind=KIND_CONTROL, now=now, days=days, public_key=key.public_key())
    write_atomic(key_path, key_pem(key), mode=0o600)
    write_atomic(cert_path, cert_pem(cert), mode=0o644)
    return ControlIdentity(cn, cert_path, key_path, format(cert.serial_number, "x"))


def control_identities(ca: FleetCa, *, now: int) -> list[str]:
    """``control`` and every replica CN with an unrevoked, unexpired certificate: the user
    names the broker's ACL gives the control rights."""
    names = [CONTROL_CN]
    for item in ca.register():
        cn = item.get("cn")
        if (
            item.get("kind") == KIND_CONTROL
            and isinstance(cn, str)
            and cn not in names
            and not item.get("revoked_at")
            and int(item.get("not_after", 0)) > now
        ):
            replica_cn(cn.removeprefix(CONTROL_CN + REPLICA_CN_SEPARATOR))  # never a bad CN
            names.append(cn)
    return names


def _unrevoked(ca: FleetCa, cn: str) -> list[str]:
    return [
        str(i["serial"])
        for i in ca.register()
        if i.get("cn") == cn and i.get("kind") == KIND_CONTROL and not i.get("revoked_at")
    ]


def issue_control_identity(
    root: Path, name: str, *, now: int, days: int = SERVER_DAYS, reissue: bool = False
) -> ControlIdentity:
    """Issue replica ``name`` its identity ``control:NAME``. A second one for the same name
    needs ``reissue``, which revokes the earlier certificates."""
    cn = replica_cn(name)
    check_days(days)
    ca = FleetCa.load(root)
    earlier = _unrevoked(ca, cn)
    if earlier and not reissue:
        raise AlreadyIssued(
            "control-identity",
            cn,
            f"replica {name!r} has an identity already ({cn}, serial {earlier[-1]})",
            hint="--reissue makes a new key and certificate and revokes the old ones",
        )
    identity = write_control_identity(ca, cn, now=now, days=days)
    revoked = ca.revoke(cn, now=now, kind=KIND_CONTROL, keep=int(identity.serial, 16))
    return ControlIdentity(cn, identity.cert, identity.key, identity.serial, tuple(revoked))


def revoke_control_identity(root: Path, name: str, *, now: int) -> list[str]:
    """Revoke every certificate of replica ``name``; the CRL is rewritten."""
    cn = replica_cn(name)
    ca = FleetCa.load(root)
    serials = ca.revoke(cn, now=now, kind=KIND_CONTROL)
    if not serials:
        raise NotIssued(
            "control-identity", cn, f"replica {name!r} has no unrevoked identity ({cn})"
        )
    return serials
