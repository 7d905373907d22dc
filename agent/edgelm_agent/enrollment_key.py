"""A device key made on the device: ``edgelm agent enroll --csr``, then ``enroll BUNDLE``.

By default the operator's machine makes a device's TLS key and sends it inside the bundle.
With ``--csr`` the key is made here, where it will live, and never leaves:

1. ``edgelm agent enroll --csr --device-id ID`` makes an ECDSA P-256 key, pending, under
   ``<state_dir>/fleet/pending/key.pem`` (0600, in a 0700 folder), and writes a PKCS#10
   request for CN = ID, signed with that key (``pending/request.pem``, and ``--out``). Run
   again for the same id, it reuses the pending key (the request may be signed already);
   ``new_key`` starts over.
2. The operator signs it: ``edgelm provision device ID --csr request.pem --out ID.json``.
   The bundle carries the certificate and no key.
3. ``edgelm agent enroll ID.json`` pairs the certificate with the pending key
   (:func:`pair_pending_key`): a certificate for any other key is refused, so a bundle meant
   for another device, or for an older request, cannot be installed. The key then moves to
   ``fleet/tls/client-key.pem`` with the rest of the enrollment, and the pending folder goes.

A pending key does not disturb a device that is enrolled already: its current identity stays
in use until the new bundle is enrolled (that is how a device renews its certificate, or
moves to a new CA during a rotation, without its key ever leaving it).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgelm_agent.enrollment import Enrollment, EnrollmentError, fleet_dir, public_key_der
from edgelm_protocol.errors import InvalidId
from edgelm_protocol.ids import check_device_id
from edgelm_protocol.repository.atomic_file import write_atomic

PENDING_DIR = "pending"
PENDING_KEY_FILE = "key.pem"
PENDING_REQUEST_FILE = "request.pem"


class PendingKeyError(EnrollmentError):
    """The pending key cannot be made, found or paired; nothing was changed."""

    code = "enrollment_key"


@dataclass(frozen=True)
class PendingRequest:
    """A key waiting for its certificate, and the request that asks for one."""

    device_id: str
    key_path: Path
    request_path: Path
    request_pem: str
    #: True when an earlier ``--csr`` made the key and this one reused it.
    reused: bool

    def public_key_sha256(self) -> str:
        """The fingerprint of the public key, for the operator to compare out of band."""
        request = x509.load_pem_x509_csr(self.request_pem.encode())
        digest = hashes.Hash(hashes.SHA256())
        digest.update(public_key_der(request.public_key()))
        return digest.finalize().hex()


def pending_files(state_dir: Path) -> tuple[Path, Path]:
    """``(key, request)`` of the pending key, under ``<state_dir>/fleet/pending/``."""
    folder = fleet_dir(state_dir) / PENDING_DIR
    return folder / PENDING_KEY_FILE, folder / PENDING_REQUEST_FILE


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise PendingKeyError(f"the pending key {path} cannot be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PendingKeyError(f"the pending key {path} is not an EC key")
    return key


def _request(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """A PKCS#10 request for CN = ``device_id``, asking for nothing else: the CA decides."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    request = x509.CertificateSigningRequestBuilder().subject_name(subject)
    return request.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _pending_device(request_path: Path) -> str | None:
    try:
        request = x509.load_pem_x509_csr(request_path.read_bytes())
    except (OSError, ValueError):
        return None
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def make_request(state_dir: Path, device_id: str, *, new_key: bool = False) -> PendingRequest:
    """Make (or reuse) the pending key for ``device_id`` and write its request."""
    try:
        check_device_id(device_id)
    except InvalidId as exc:
        raise PendingKeyError(
            f"{exc}: device ids become MQTT topic levels and broker user names"
        ) from exc
    key_path, request_path = pending_files(state_dir)
    reused = key_path.exists() and not new_key
    if reused:
        pending_for = _pending_device(request_path)
        if pending_for is not None and pending_for != device_id:
            raise PendingKeyError(
                f"a key is pending for device {pending_for!r}, not {device_id!r}; pass "
                "--new-key to replace it (a request signed for the old key can then no "
                "longer be enrolled)"
            )
        key = _load_key(key_path)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    folder = key_path.parent
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o700)
    if not reused:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(key_path, pem, mode=0o600)
    request = _request(key, device_id)
    write_atomic(request_path, request, mode=0o644)
    return PendingRequest(device_id, key_path, request_path, request.decode("ascii"), reused)


def pair_pending_key(state_dir: Path, enrollment: Enrollment) -> Enrollment:
    """The enrollment with the pending key as its TLS key, if the bundle's certificate is
    for that key; an enrollment that carries its key is returned as it is."""
    if enrollment.tls_ca is None or enrollment.tls_key is not None:
        return enrollment
    key_path, _ = pending_files(state_dir)
    if not key_path.exists():
        raise PendingKeyError(
            "the bundle carries a certificate without a key, and no key is pending in "
            f"{key_path.parent}: it answers a request made on another device, or in another "
            "state directory",
        )
    key = _load_key(key_path)
    cert = x509.load_pem_x509_certificate((enrollment.tls_cert or "").encode())
    if public_key_der(cert.public_key()) != public_key_der(key.public_key()):
        raise PendingKeyError(
            "the bundle's certificate is not for the key pending on this device (it answers "
            "another request, or an older one): ask the operator to sign this device's "
            f"current request ({key_path.parent / PENDING_REQUEST_FILE})"
        )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return dataclasses.replace(enrollment, tls_key=pem)


def clear_pending(state_dir: Path) -> None:
    """Forget the pending key, once its certificate is enrolled (it now lives in tls/)."""
    shutil.rmtree(pending_files(state_dir)[0].parent, ignore_errors=True)
