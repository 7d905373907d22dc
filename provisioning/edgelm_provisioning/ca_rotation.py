"""Rotating the fleet CA with an overlap period, so that no device is locked out on the way.

``edgelm provision ca-rotate`` starts the overlap; ``ca-rotate --finish`` ends it::

    before           overlap (ca-rotate)                      after (ca-rotate --finish)
    ──────           ───────────────────                      ──────────────────────────
    CA 1 issues      CA 2 issues; CA 1 still trusted and      CA 2 alone; CA 1's key and
                     still signs the CRL of what it issued    certificate deleted

The new CA has the same subject name as the old one and a new key (a key rollover, as in
RFC 4210's root CA key update). The old CA certifies the new key in a cross-certificate
(``tls/ca-cross.pem``); because its subject and issuer are the same name, it is "self-issued"
and does not count against the CA's path length of 0. Every server certificate issued during
the overlap (the broker's, the control plane's HTTPS one) carries it in its chain, so:

* a device that trusts only the old CA accepts the broker (server ← cross ← old CA);
* a device that trusts only the new CA accepts it too (server ← new CA);
* the broker trusts both CAs (``cafile`` is the bundle) and has both CRLs (``crlfile``), so
  devices with old and new certificates both connect, and either CA's revocations hold.

Nothing else trusts the old CA from the start on. A bundle issued during the overlap carries
the new CA alone, so a device drops the old CA when it enrolls its reissued bundle, and the
control plane's ``control/tls/ca.pem`` is the new CA alone: if the old CA's key leaked (the
reason to rotate), it can no longer pose as the broker or the repository to them.

Finishing refuses while a device's only live certificate is from the old CA (it would be
locked out), unless ``force``; it deletes the old CA's key, drops the cross-certificate from
the server chains and the old CA from the broker's ``cafile``: a certificate from the old CA is
refused by the broker from its next start. A device locked out with ``force`` still trusts the
old CA alone until it enrolls a new bundle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from edgelm_protocol.repository.atomic_file import write_atomic
from edgelm_provisioning.control_identity import control_identities, write_control_identity
from edgelm_provisioning.errors import AlreadyIssued, FleetDirError, NotIssued
from edgelm_provisioning.fleet_ca import (
    KIND_DEVICE,
    FleetCa,
    ca_builder,
    cert_pem,
    control_sans,
    key_id,
    key_pem,
    new_key,
    server_sans,
    write_server_identity,
)
from edgelm_provisioning.fleet_dir import FleetConfig


@dataclass(frozen=True)
class Rotation:
    """What a step of the rotation did, for the CLI."""

    phase: str  # "overlap" or "finished"
    ca: str  # key id of the CA that issues from now on
    previous_ca: str | None
    written: tuple[str, ...]
    removed: tuple[str, ...] = ()
    #: Devices whose only live certificate is from the previous CA.
    devices_on_previous_ca: tuple[str, ...] = ()
    control_identities: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "ca": self.ca,
            "previous_ca": self.previous_ca,
            "written": list(self.written),
            "removed": list(self.removed),
            "devices_on_previous_ca": list(self.devices_on_previous_ca),
            "control_identities": list(self.control_identities),
        }


def devices_on_previous_ca(ca: FleetCa, *, now: int) -> list[str]:
    """Devices with a live (unrevoked, unexpired) certificate from the previous CA and none
    from the current one: those that finishing the rotation would lock out."""
    if ca.previous is None:
        return []
    current, previous = key_id(ca.cert), key_id(ca.previous)
    issuers: dict[str, set[str]] = {}
    for item in ca.register():
        if (
            item.get("kind") == KIND_DEVICE
            and not item.get("revoked_at")
            and int(item.get("not_after", 0)) > now
        ):
            issuers.setdefault(str(item.get("cn")), set()).add(str(item.get("ca", previous)))
    return sorted(cn for cn, cas in issuers.items() if previous in cas and current not in cas)


def _cross_certificate(
    ca: FleetCa, new: x509.Certificate, new_key: ec.EllipticCurvePublicKey, now: int
) -> x509.Certificate:
    """The new CA's key certified by the old CA: NewWithOld, self-issued (same name)."""
    old = ca.cert
    return (
        ca_builder(
            old.subject,
            new_key,
            now=now,
            not_after=min(old.not_valid_after_utc, new.not_valid_after_utc),
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


def _relative(ca: FleetCa, paths: list[Path]) -> tuple[str, ...]:
    return tuple(str(p.relative_to(ca.paths.root)) for p in paths)


def start_rotation(
    root: Path, config: FleetConfig, *, now: int, sans: list[str] | None = None
) -> Rotation:
    """Make a new CA beside the current one and start the overlap period.

    Written: the new CA (``keys/fleet-ca.pem``, ``tls/ca.pem``), the old one moved beside it
    (``keys/fleet-ca-previous.pem``, ``tls/ca-previous.pem``), the cross-certificate, new
    broker and control-plane server certificates (same SANs unless ``sans``), new
    certificates for every control identity, ``control/tls/ca.pem`` (the new CA alone) and
    both CRLs in ``tls/crl.pem``.
    """
    ca = FleetCa.load(root)
    if ca.rotating:
        raise AlreadyIssued(
            "ca-rotation",
            str(root),
            f"a CA rotation is in progress in {root} already (previous CA "
            f"{key_id(ca.previous) if ca.previous else '?'})",
            hint="finish it first: edgelm provision ca-rotate --finish",
        )
    paths = ca.paths
    old_id = key_id(ca.cert)
    # Each CRL lists only what its CA issued, so the register must say who issued what.
    ca.mark_unmarked_issuer(ca.cert)
    key = new_key()
    cert = ca_builder(ca.cert.subject, key.public_key(), now=now).sign(key, hashes.SHA256())
    cross = _cross_certificate(ca, cert, key.public_key(), now)
    # The old CA goes beside the new one before the new one takes its place: interrupted
    # before the last two writes, the rotation leaves two copies of the old CA, which load()
    # reads as no rotation, and ca-rotate runs again. Between those two writes the key and
    # the certificate do not match: load() refuses that, and its hint puts the old key back.
    write_atomic(paths.previous_ca_key, key_pem(ca.key), mode=0o600)
    write_atomic(paths.previous_ca_cert, cert_pem(ca.cert), mode=0o644)
    write_atomic(paths.cross_cert, cert_pem(cross), mode=0o644)
    write_atomic(paths.ca_key, key_pem(key), mode=0o600)
    write_atomic(paths.ca_cert, cert_pem(cert), mode=0o644)
    ca = FleetCa.load(root)
    written = [
        paths.ca_key,
        paths.ca_cert,
        paths.previous_ca_key,
        paths.previous_ca_cert,
        paths.cross_cert,
    ]
    written += _reissue_servers(ca, config, now=now, sans=sans)
    identities = control_identities(ca, now=now)
    for cn in identities:
        identity = write_control_identity(ca, cn, now=now)
        written += [identity.cert, identity.key]
    # The control plane verifies the broker, whose certificate is the new CA's from now on
    # (the control plane's own new identity is refused by a broker not reconfigured yet).
    write_atomic(paths.control_ca, ca.ca_pem.encode(), mode=0o644)
    ca.write_crl(now=now)
    written += [paths.control_ca, paths.crl]
    return Rotation(
        phase="overlap",
        ca=key_id(ca.cert),
        previous_ca=old_id,
        written=_relative(ca, written),
        devices_on_previous_ca=tuple(devices_on_previous_ca(ca, now=now)),
        control_identities=tuple(identities),
    )


def _reissue_servers(
    ca: FleetCa, config: FleetConfig, *, now: int, sans: list[str] | None
) -> list[Path]:
    paths = ca.paths
    broker_sans = sans or server_sans(paths.server_cert)
    write_server_identity(ca, broker_sans, paths.server_cert, paths.server_key, now=now)
    control = (
        server_sans(paths.control_server_cert)
        if paths.control_server_cert.exists()
        else control_sans(config)
    )
    write_server_identity(ca, control, paths.control_server_cert, paths.control_server_key, now=now)
    return [
        paths.server_cert,
        paths.server_key,
        paths.control_server_cert,
        paths.control_server_key,
    ]


def finish_rotation(root: Path, *, now: int, force: bool = False) -> Rotation:
    """End the overlap: the previous CA is trusted nowhere any more and its key is deleted."""
    ca = FleetCa.load(root)
    if ca.previous is None:
        raise NotIssued(
            "ca-rotation",
            str(root),
            "no CA rotation is in progress: there is no previous CA to drop",
            hint="start one with edgelm provision ca-rotate",
        )
    stranded = devices_on_previous_ca(ca, now=now)
    if stranded and not force:
        shown = ", ".join(stranded[:10]) + (" ..." if len(stranded) > 10 else "")
        raise FleetDirError(
            "devices-on-previous-ca",
            root,
            f"{len(stranded)} device(s) hold a certificate from the previous CA only and would "
            f"be locked out: {shown}",
            hint="reissue them (edgelm provision device ID --reissue, or --csr) and enroll the "
            "new bundles; or --force to lock them out",
        )
    paths = ca.paths
    previous_id = key_id(ca.previous)
    for server in (paths.server_cert, paths.control_server_cert):
        if server.exists():  # the leaf alone: the cross-certificate leads to a CA now gone
            leaf = x509.load_pem_x509_certificate(server.read_bytes())
            write_atomic(server, cert_pem(leaf), mode=0o644)
    removed = [paths.previous_ca_key, paths.previous_ca_cert, paths.cross_cert]
    for path in removed:
        path.unlink(missing_ok=True)
    ca = FleetCa.load(root)
    write_atomic(paths.control_ca, ca.ca_pem.encode(), mode=0o644)
    ca.write_crl(now=now)
    return Rotation(
        phase="finished",
        ca=key_id(ca.cert),
        previous_ca=previous_id,
        written=_relative(
            ca, [paths.server_cert, paths.control_server_cert, paths.control_ca, paths.crl]
        ),
        removed=_relative(ca, removed),
        devices_on_previous_ca=tuple(stranded),
        control_identities=tuple(control_identities(ca, now=now)),
    )
