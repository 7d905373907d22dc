"""The fleet's certificate authority: mutual TLS between devices, the broker and the control plane.

``edgelm provision fleet-init`` (or ``ca-init`` for a fleet made before) creates:

==============================  =====================  ==========================================
file                            where it goes          what it is
==============================  =====================  ==========================================
keys/fleet-ca.pem               stays (offline, 0600)  the CA's private key: signs every identity
tls/ca.pem                      everywhere             the CA certificate (public trust anchor)
tls/issued.json                 stays                  every certificate issued: serial, CN, kind,
                                                       expiry, revocation time (no secret)
tls/crl.pem                     the broker             the CA's certificate revocation list
broker/server.pem, -key.pem     the broker (0600 key)  the broker's server certificate
control/tls/client.pem, -key    the control plane      its MQTT client identity, CN ``control``
control/tls/ca.pem              the control plane      copy of tls/ca.pem
==============================  =====================  ==========================================

Every device gets its own key and certificate (CN = device id) in its enrollment bundle.
Client certificates carry the clientAuth extended key usage only, ``CA:FALSE`` and the
digitalSignature key usage, and a random 128-bit serial. Keys are ECDSA P-256.

The CN becomes the broker user name (Mosquitto ``use_identity_as_username``) that the ACL's
``%u`` patterns substitute, so it passes the device-id check: ``+``, ``#``, ``/`` and the
reserved ``control`` (the control plane's own identity) are refused before any certificate is
made (the CVE-2017-7650 class).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgelm_protocol.ids import CONTROL_SENDER
from edgelm_protocol.mqtt import parse_broker_url
from edgelm_protocol.repository.atomic_file import write_atomic
from edgelm_provisioning.errors import AlreadyIssued, FleetDirError, InvalidValue, NotIssued
from edgelm_provisioning.fleet_dir import FleetConfig, FleetPaths

CA_DAYS = 3650
SERVER_DAYS = 825
DEFAULT_CLIENT_DAYS = 730
MAX_CLIENT_DAYS = 3650
CONTROL_CN = CONTROL_SENDER
"""The control plane's broker identity. ``control`` is never a device id."""
DEFAULT_SANS = ("localhost", "127.0.0.1")
KIND_DEVICE = "device"
KIND_CONTROL = "control"
KIND_SERVER = "server"


@dataclass(frozen=True)
class CaPaths:
    """Where the CA's files live in a fleet directory."""

    root: Path

    @property
    def ca_key(self) -> Path:
        return self.root / "keys" / "fleet-ca.pem"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def ca_cert(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def issued(self) -> Path:
        return self.tls_dir / "issued.json"

    @property
    def crl(self) -> Path:
        return self.tls_dir / "crl.pem"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def server_cert(self) -> Path:
        return self.broker_dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.broker_dir / "server-key.pem"

    @property
    def control_tls_dir(self) -> Path:
        return self.root / "control" / "tls"

    @property
    def control_ca(self) -> Path:
        return self.control_tls_dir / "ca.pem"

    @property
    def control_cert(self) -> Path:
        return self.control_tls_dir / "client.pem"

    @property
    def control_key(self) -> Path:
        return self.control_tls_dir / "client-key.pem"

    def exists(self) -> bool:
        return self.ca_key.exists() or self.ca_cert.exists()


def _now(now: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def random_serial() -> int:
    """A random 128-bit serial (never 0: serials are positive)."""
    return secrets.randbits(128) or 1


def check_days(days: int, param: str = "cert_days") -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 0 < days <= MAX_CLIENT_DAYS:
        raise InvalidValue(param, f"validity must be 1-{MAX_CLIENT_DAYS} days, got {days!r}")
    return days


def check_san(value: str) -> x509.GeneralName:
    """A SAN: an IP address, or a DNS name of letters, digits, ``-`` and ``.``."""
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.split(".") if isinstance(value, str) else []
    if (
        not value
        or len(value) > 253
        or not all(
            0 < len(lb) <= 63
            and lb.isascii()
            and (lb.replace("-", "").isalnum() or lb == "*")
            and not lb.startswith("-")
            for lb in labels
        )
    ):
        raise InvalidValue("san", f"a SAN is a DNS name or an IP address, got {value!r}")
    return x509.DNSName(value.lower())


def default_sans(config: FleetConfig) -> list[str]:
    """localhost, 127.0.0.1 and the broker URL's host."""
    host = parse_broker_url(config.broker_url).host
    return list(dict.fromkeys([*DEFAULT_SANS, host]))


@dataclass
class FleetCa:
    """The CA of one fleet directory, loaded: its key, certificate and register."""

    paths: CaPaths
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def load(cls, root: Path) -> FleetCa:
        paths = CaPaths(root)
        if not paths.ca_key.exists() or not paths.ca_cert.exists():
            raise FleetDirError(
                "fleet-ca-missing",
                root,
                f"the fleet directory {root} has no certificate authority",
                hint=f"create it with `edgelm provision ca-init --fleet-dir {root}` "
                "(fleets made by this version's fleet-init have one)",
            )
        key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidValue(str(paths.ca_key), f"{paths.ca_key} is not an EC private key")
        return cls(paths, key, x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()))

    @property
    def ca_pem(self) -> str:
        return cert_pem(self.cert).decode("ascii")

    # --- the register --------------------------------------------------------------------

    def register(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.paths.issued.read_bytes())
        except FileNotFoundError:
            return []
        items = data.get("certificates") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise InvalidValue(str(self.paths.issued), f"{self.paths.issued} is not a register")
        return items

    def _save_register(self, items: list[dict[str, Any]]) -> None:
        body = json.dumps({"certificates": items}, indent=2) + "\n"
        write_atomic(self.paths.issued, body.encode(), mode=0o644)

    def _record(self, cert: x509.Certificate, cn: str, kind: str) -> None:
        items = self.register()
        items.append(
            {
                "serial": format(cert.serial_number, "x"),
                "cn": cn,
                "kind": kind,
                "not_after": int(cert.not_valid_after_utc.timestamp()),
                "revoked_at": None,
            }
        )
        self._save_register(items)

    # --- issuing -------------------------------------------------------------------------

    def _builder(self, cn: str, public_key: Any, now: int, days: int) -> x509.CertificateBuilder:
        start = _now(now) - dt.timedelta(minutes=5)  # a device clock a little behind
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(start)
            .not_valid_after(_now(now) + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )

    def issue_client(
        self, cn: str, *, kind: str, now: int, days: int = DEFAULT_CLIENT_DAYS, public_key: Any
    ) -> x509.Certificate:
        """A client certificate for ``public_key``: CN, clientAuth only, CA:FALSE."""
        check_days(days)
        cert = (
            self._builder(cn, public_key, now, days)
            .add_extension(_digital_signature(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self._record(cert, cn, kind)
        return cert

    def issue_server(self, sans: Iterable[str], *, now: int) -> tuple[bytes, x509.Certificate]:
        names = [check_san(s) for s in sans]
        if not names:
            raise InvalidValue("san", "the broker certificate needs at least one SAN")
        key = _new_key()
        first = names[0].value
        cert = (
            self._builder(str(first), key.public_key(), now, SERVER_DAYS)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(_digital_signature(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self._record(cert, str(first), KIND_SERVER)
        return key_pem(key), cert

    # --- revocation ----------------------------------------------------------------------

    def revoke(
        self, cn: str, *, now: int, kind: str = KIND_DEVICE, keep: int | None = None
    ) -> list[str]:
        """Mark every unrevoked certificate of ``cn`` (but serial ``keep``) revoked; rewrite
        the CRL."""
        items = self.register()
        serials = []
        kept = None if keep is None else format(keep, "x")
        for item in items:
            if (
                item.get("cn") == cn
                and item.get("kind") == kind
                and not item.get("revoked_at")
                and item.get("serial") != kept
            ):
                item["revoked_at"] = now
                serials.append(str(item["serial"]))
        if serials:
            self._save_register(items)
            self.write_crl(now=now)
        return serials

    def crl(self, *, now: int) -> x509.CertificateRevocationList:
        """The CRL of every revoked certificate; valid until the CA itself expires, so an
        unattended broker never starts refusing every client because its CRL went stale."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(_now(now) - dt.timedelta(minutes=5))
            .next_update(self.cert.not_valid_after_utc)
            .add_extension(x509.CRLNumber(now), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        for item in self.register():
            if item.get("revoked_at"):
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(str(item["serial"]), 16))
                    .revocation_date(_now(int(item["revoked_at"])))
                    .build()
                )
        return builder.sign(self.key, hashes.SHA256())

    def crl_pem(self, *, now: int) -> bytes:
        return self.crl(now=now).public_bytes(serialization.Encoding.PEM)

    def write_crl(self, *, now: int) -> Path:
        write_atomic(self.paths.crl, self.crl_pem(now=now), mode=0o644)
        return self.paths.crl


def _digital_signature() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(
    root: Path,
    config: FleetConfig,
    *,
    now: int,
    sans: Iterable[str] | None = None,
) -> FleetCa:
    """Create the CA, the broker's certificate and the control plane's identity in ``root``."""
    paths = CaPaths(root)
    if paths.exists():
        raise AlreadyIssued(
            "fleet-ca",
            str(root),
            f"{root} has a certificate authority already; refusing to replace it",
            hint="a new CA would lock out every device; see docs/fleet.md on CA rotation",
        )
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgelm"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"edgelm fleet {config.fleet} CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(_now(now) - dt.timedelta(minutes=5))
        .not_valid_after(_now(now) + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    for folder in (paths.ca_key.parent, paths.tls_dir, paths.broker_dir, paths.control_tls_dir):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
    paths.tls_dir.chmod(0o755)  # public material only
    write_atomic(paths.ca_key, key_pem(key), mode=0o600)
    write_atomic(paths.ca_cert, cert_pem(cert), mode=0o644)
    ca = FleetCa(paths, key, cert)
    ca._save_register([])
    server_key, server_cert = ca.issue_server(
        sans if sans is not None else default_sans(config), now=now
    )
    write_atomic(paths.server_key, server_key, mode=0o600)
    write_atomic(paths.server_cert, cert_pem(server_cert), mode=0o644)
    control_key = _new_key()
    control_cert = ca.issue_client(
        CONTROL_CN,
        kind=KIND_CONTROL,
        now=now,
        days=SERVER_DAYS,
        public_key=control_key.public_key(),
    )
    write_atomic(paths.control_key, key_pem(control_key), mode=0o600)
    write_atomic(paths.control_cert, cert_pem(control_cert), mode=0o644)
    write_atomic(paths.control_ca, cert_pem(cert), mode=0o644)
    ca.write_crl(now=now)
    return ca


def issue_device_identity(
    ca: FleetCa, device_id: str, *, now: int, days: int = DEFAULT_CLIENT_DAYS
) -> dict[str, str]:
    """A new key and certificate for a device, as the bundle's ``tls`` object.

    ``device_id`` must have passed :func:`edgelm_protocol.ids.check_device_id` (the caller's
    job); it is checked again here so that no code path makes a wildcard identity.
    """
    from edgelm_provisioning.enrollment import checked_device_id

    checked_device_id(device_id)
    key = _new_key()
    cert = ca.issue_client(
        device_id, kind=KIND_DEVICE, now=now, days=days, public_key=key.public_key()
    )
    return {
        "ca": ca.ca_pem,
        "cert": cert_pem(cert).decode("ascii"),
        "key": key_pem(key).decode("ascii"),
    }


def revoke_device(root: Path, device_id: str, *, now: int) -> tuple[list[str], Path]:
    """Revoke every certificate issued to ``device_id``; return the serials and the CRL."""
    from edgelm_provisioning.enrollment import checked_device_id

    checked_device_id(device_id)
    ca = FleetCa.load(root)
    serials = ca.revoke(device_id, now=now)
    if not serials:
        known = any(i.get("cn") == device_id for i in ca.register())
        raise NotIssued(
            "device",
            device_id,
            f"device {device_id!r} has no unrevoked certificate"
            if known
            else f"no certificate was ever issued to {device_id!r}",
        )
    return serials, ca.paths.crl


def ca_exists(paths: FleetPaths) -> bool:
    return CaPaths(paths.root).exists()
