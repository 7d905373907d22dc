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
control/tls/server.pem, -key    the control plane      its HTTPS certificate (repository, API)
control/tls/ca.pem              the control plane      the CA it verifies the broker against
                                                       (tls/ca.pem)
==============================  =====================  ==========================================

Every device gets its own key and certificate (CN = device id) in its enrollment bundle, or
sends a certificate signing request for a key it made itself (:mod:`edgelm_provisioning.csr`).
Control-plane replicas get one identity each (:mod:`edgelm_provisioning.control_identity`).
A CA rotation (:mod:`edgelm_provisioning.ca_rotation`) keeps the previous CA beside the new one
for an overlap period: ``keys/fleet-ca-previous.pem``, ``tls/ca-previous.pem`` and the
cross-certificate ``tls/ca-cross.pem`` (the new CA's key, certified by the previous CA). Only
the broker trusts both (for client certificates); a bundle carries the CA that issues, alone.
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
import urllib.parse
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
PEM_CERT_BEGIN = b"-----BEGIN CERTIFICATE-----"


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

    @property
    def control_server_cert(self) -> Path:
        return self.control_tls_dir / "server.pem"

    @property
    def control_server_key(self) -> Path:
        return self.control_tls_dir / "server-key.pem"

    def replica_dir(self, name: str) -> Path:
        """Where the broker identity of control-plane replica ``name`` is written."""
        return self.control_tls_dir / "replicas" / name

    @property
    def previous_ca_key(self) -> Path:
        return self.root / "keys" / "fleet-ca-previous.pem"

    @property
    def previous_ca_cert(self) -> Path:
        return self.tls_dir / "ca-previous.pem"

    @property
    def cross_cert(self) -> Path:
        return self.tls_dir / "ca-cross.pem"

    def exists(self) -> bool:
        return self.ca_key.exists() or self.ca_cert.exists()


def _now(now: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 key, the kind of every identity the fleet CA issues."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_id(cert: x509.Certificate) -> str:
    """A CA's key identifier (its SubjectKeyIdentifier, hex): which CA issued a certificate."""
    return key_id_of(cert.public_key())


def key_id_of(public_key: Any) -> str:
    """The key identifier of a public key, as :func:`key_id` gives a certificate's."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest.hex()


def load_certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, or ``InvalidValue`` naming ``what``."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise InvalidValue(what, f"{what} is not a PEM certificate bundle: {exc}") from exc


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


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidValue(str(path), f"{path} is not an EC private key")
    return key


def _require_pair(
    paths: CaPaths,
    key_path: Path,
    key: ec.EllipticCurvePrivateKey,
    cert_path: Path,
    cert: x509.Certificate,
    *,
    interrupted: x509.Certificate | None = None,
) -> None:
    """Refuse a CA key that is not the key of the CA certificate beside it.

    ``interrupted`` is the previous CA's certificate, when there is one: if it is the
    certificate found here too, a ``ca-rotate`` stopped after writing the new key, and the
    hint says how to go back to the intact old CA."""
    if key_id_of(key.public_key()) == key_id(cert):
        return
    root = paths.root
    if interrupted is not None and key_id(interrupted) == key_id(cert):
        hint = (
            f"a ca-rotate was interrupted after writing the new CA's key; the old CA is intact "
            f"in {paths.previous_ca_key} and {paths.previous_ca_cert}: copy "
            f"{paths.previous_ca_key} over {key_path}, then run `edgelm provision ca-rotate "
            f"--fleet-dir {root}` again"
        )
    else:
        hint = f"restore {key_path} and {cert_path} together from the fleet directory's backup"
    raise FleetDirError(
        "fleet-ca-key-mismatch",
        root,
        f"the CA key {key_path} (key id {key_id_of(key.public_key())}) is not the key of the "
        f"CA certificate {cert_path} (key id {key_id(cert)}): refusing to issue with it",
        hint=hint,
    )


@dataclass
class FleetCa:
    """The CA of one fleet directory, loaded: its key, certificate and register.

    During a CA rotation ``previous`` and ``previous_key`` are the CA being retired (it still
    signs the CRL of what it issued) and ``cross`` certifies the new CA's key under it, so a
    device that trusts only the previous CA still accepts servers the new CA certified.
    """

    paths: CaPaths
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    previous: x509.Certificate | None = None
    previous_key: ec.EllipticCurvePrivateKey | None = None
    cross: x509.Certificate | None = None

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
        ca = cls(
            paths,
            _load_key(paths.ca_key),
            x509.load_pem_x509_certificate(paths.ca_cert.read_bytes()),
        )
        previous = (
            x509.load_pem_x509_certificate(paths.previous_ca_cert.read_bytes())
            if paths.previous_ca_cert.exists()
            else None
        )
        # A key that is not the certificate's would sign certificates nothing verifies (and
        # a CRL the broker rejects): ca-rotate interrupted between writing the new CA's key
        # and its certificate leaves exactly that.
        _require_pair(paths, paths.ca_key, ca.key, paths.ca_cert, ca.cert, interrupted=previous)
        # The same CA on both sides is a rotation interrupted before the new CA was
        # written: no rotation yet (ca-rotate starts it again).
        if previous is not None and key_id(previous) != key_id(ca.cert):
            ca.previous = previous
            ca.previous_key = _load_key(paths.previous_ca_key)
            _require_pair(
                paths, paths.previous_ca_key, ca.previous_key, paths.previous_ca_cert, previous
            )
            ca.cross = x509.load_pem_x509_certificate(paths.cross_cert.read_bytes())
        return ca

    @property
    def ca_pem(self) -> str:
        return cert_pem(self.cert).decode("ascii")

    @property
    def rotating(self) -> bool:
        """Whether a CA rotation's overlap period is on (a previous CA is still trusted)."""
        return self.previous is not None

    @property
    def trust_pem(self) -> str:
        """The CA certificates the broker accepts client certificates from: this CA, and
        during a rotation the previous one. Never a device's or a client's trust anchor: the
        previous CA's key may be why the CA rotates."""
        previous = b"" if self.previous is None else cert_pem(self.previous)
        return (cert_pem(self.cert) + previous).decode("ascii")

    @property
    def chain_pem(self) -> bytes:
        """What a server sends after its own certificate: during a rotation the
        cross-certificate, so that devices trusting only the previous CA accept it."""
        return b"" if self.cross is None else cert_pem(self.cross)

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

    def mark_unmarked_issuer(self, ca: x509.Certificate) -> None:
        """Record ``ca`` as the issuer of every entry that names none: those made before CA
        rotations existed, all by the one CA there was."""
        items = self.register()
        for item in items:
            item.setdefault("ca", key_id(ca))
        self._save_register(items)

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
                "ca": key_id(self.cert),
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
        key = new_key()
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

    def crl(
        self,
        *,
        now: int,
        issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ) -> x509.CertificateRevocationList:
        """The CRL of every revoked certificate the CA (or ``issuer``) issued; valid until
        that CA expires, so an unattended broker never starts refusing every client because
        its CRL went stale. An entry that does not say which CA issued it (made before CA
        rotations existed) goes in every CRL: a serial a CA never issued is harmless there."""
        cert, key = issuer or (self.cert, self.key)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(cert.subject)
            .last_update(_now(now) - dt.timedelta(minutes=5))
            .next_update(cert.not_valid_after_utc)
            .add_extension(x509.CRLNumber(now), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                critical=False,
            )
        )
        mine = key_id(cert)
        for item in self.register():
            if item.get("revoked_at") and item.get("ca", mine) == mine:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(str(item["serial"]), 16))
                    .revocation_date(_now(int(item["revoked_at"])))
                    .build()
                )
        return builder.sign(key, hashes.SHA256())

    def crl_pem(self, *, now: int) -> bytes:
        """The CRL, and during a rotation the previous CA's after it (a broker's crlfile
        holds both; OpenSSL picks each by its authority key identifier)."""
        pem = self.crl(now=now).public_bytes(serialization.Encoding.PEM)
        if self.previous is not None and self.previous_key is not None:
            previous = self.crl(now=now, issuer=(self.previous, self.previous_key))
            pem += previous.public_bytes(serialization.Encoding.PEM)
        return pem

    def write_crl(self, *, now: int) -> Path:
        write_atomic(self.paths.crl, self.crl_pem(now=now), mode=0o644)
        return self.paths.crl


def write_server_identity(
    ca: FleetCa, sans: Iterable[str], cert_path: Path, key_path: Path, *, now: int
) -> x509.Certificate:
    """Issue a TLS server certificate for ``sans``; write it (with the CA's chain, see
    :attr:`FleetCa.chain_pem`) and its key (0600)."""
    key, cert = ca.issue_server(sans, now=now)
    write_atomic(key_path, key, mode=0o600)
    write_atomic(cert_path, cert_pem(cert) + ca.chain_pem, mode=0o644)
    return cert


def server_sans(cert_path: Path) -> list[str]:
    """The SANs of a server certificate written before (to issue its successor)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in names]


def control_sans(config: FleetConfig) -> list[str]:
    """localhost, 127.0.0.1 and the control URL's host: the control plane's HTTPS names."""
    host = urllib.parse.urlsplit(config.control_url).hostname or "localhost"
    return list(dict.fromkeys([*DEFAULT_SANS, host]))


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


def ca_builder(
    name: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    *,
    now: int,
    not_after: dt.datetime | None = None,
) -> x509.CertificateBuilder:
    """A fleet CA certificate for ``public_key``, unsigned, issued by ``name`` itself: CA,
    path length 0 (it issues leaves only), keyCertSign and cRLSign, valid ``CA_DAYS`` (or
    until ``not_after``)."""
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(_now(now) - dt.timedelta(minutes=5))
        .not_valid_after(not_after or _now(now) + dt.timedelta(days=CA_DAYS))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
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
            hint="a new CA would lock out every device: rotate it with an overlap period "
            "instead (`edgelm provision ca-rotate`, docs/fleet.md)",
        )
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgelm"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"edgelm fleet {config.fleet} CA"),
        ]
    )
    cert = ca_builder(name, key.public_key(), now=now).sign(key, hashes.SHA256())
    for folder in (paths.ca_key.parent, paths.tls_dir, paths.broker_dir, paths.control_tls_dir):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
    paths.tls_dir.chmod(0o755)  # public material only
    write_atomic(paths.ca_key, key_pem(key), mode=0o600)
    write_atomic(paths.ca_cert, cert_pem(cert), mode=0o644)
    ca = FleetCa(paths, key, cert)
    ca._save_register([])
    write_server_identity(
        ca,
        sans if sans is not None else default_sans(config),
        paths.server_cert,
        paths.server_key,
        now=now,
    )
    write_server_identity(
        ca, control_sans(config), paths.control_server_cert, paths.control_server_key, now=now
    )
    control_key = new_key()
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
    ca: FleetCa,
    device_id: str,
    *,
    now: int,
    days: int = DEFAULT_CLIENT_DAYS,
    public_key: ec.EllipticCurvePublicKey | None = None,
) -> dict[str, str]:
    """A device's certificate, as the bundle's ``tls`` object: ``ca`` (the CA that issued it,
    alone: during a CA rotation the device drops the previous CA when it enrolls this bundle),
    ``cert``, and ``key`` when the key is made here. With ``public_key`` (from a request the
    device made, checked by :func:`edgelm_provisioning.csr.check_csr`) there is no ``key``:
    it never left the device.

    ``device_id`` must have passed :func:`edgelm_protocol.ids.check_device_id` (the caller's
    job); it is checked again here so that no code path makes a wildcard identity.
    """
    from edgelm_provisioning.enrollment import checked_device_id

    checked_device_id(device_id)
    key = new_key() if public_key is None else None
    cert = ca.issue_client(
        device_id,
        kind=KIND_DEVICE,
        now=now,
        days=days,
        public_key=public_key if key is None else key.public_key(),
    )
    # The new CA alone, even during the overlap: the broker's and the control plane's server
    # certificates are the new CA's from ca-rotate on, and trusting the previous CA too
    # would let its key (perhaps leaked: the reason to rotate) pose as either.
    tls = {"ca": ca.ca_pem, "cert": cert_pem(cert).decode("ascii")}
    if key is not None:
        tls["key"] = key_pem(key).decode("ascii")
    return tls


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
