"""Certificate signing requests from devices that make their own key. Pure: bytes in, a checked
public key out, or :class:`~edgelm_provisioning.errors.RefusedRequest` saying why not.

``edgelm agent enroll --csr`` makes the device's key where it will live and writes a PKCS#10
request; ``edgelm provision device ID --csr FILE`` signs it. The request is a claim made by
whoever holds the key, so it decides nothing but the public key:

* its signature must verify with the key it carries (proof that the sender holds the key, and
  that nothing was changed on the way), with SHA-256 or stronger;
* its subject must be exactly one CN equal to the device id being issued, and that id must
  pass the device-id rules (no ``+ # / $``, never ``control``: the CVE-2017-7650 class);
* the key must be ECDSA on P-256 or P-384, what every TLS stack of the fleet speaks;
* the extensions it asks for are never copied: the CA makes a clientAuth-only, CA:FALSE leaf
  whatever was asked. A request that asks to be a CA (basicConstraints CA:TRUE, or the
  keyCertSign or cRLSign key usage) is refused outright: nothing honest asks for that, so
  it is reported rather than quietly signed as something else. Other requested extensions
  (a SAN, an EKU) are listed in the result as ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from edgelm_protocol.errors import InvalidId
from edgelm_protocol.ids import check_device_id
from edgelm_provisioning.errors import RefusedRequest

MAX_CSR_BYTES = 64 * 1024
ACCEPTED_CURVES = ("secp256r1", "secp384r1")
_STRONG_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_HINT = "make a new request on the device: edgelm agent enroll --csr --device-id ID"


@dataclass(frozen=True)
class CheckedRequest:
    """What a request may decide: the public key, for ``device_id``."""

    device_id: str
    public_key: ec.EllipticCurvePublicKey
    #: Extensions the request asked for and the CA did not grant (dotted OIDs or names).
    ignored_extensions: tuple[str, ...] = ()


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """A PEM (or DER) PKCS#10 request, or ``RefusedRequest('malformed')``."""
    if len(data) > MAX_CSR_BYTES:
        raise RefusedRequest(
            "malformed", f"a CSR is at most {MAX_CSR_BYTES} bytes, this one is {len(data)}"
        )
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise RefusedRequest(
            "malformed",
            f"expected a PKCS#10 certificate signing request (PEM or DER), got something "
            f"else: {exc}",
            hint=_HINT,
        ) from exc


def check_csr(data: bytes, device_id: str) -> CheckedRequest:
    """Check a request for ``device_id``: the CA will sign its key, and nothing else of it."""
    try:
        check_device_id(device_id)
    except InvalidId as exc:
        raise RefusedRequest(
            "wrong-cn",
            f"{exc}: no certificate is issued for it",
            hint="device ids become MQTT topic levels and broker user names",
        ) from exc
    csr = load_csr(data)
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ACCEPTED_CURVES:
        raise RefusedRequest(
            "weak-key",
            f"expected an ECDSA key on {' or '.join(ACCEPTED_CURVES)}, got {_describe(key)}",
            hint=_HINT,
        )
    try:
        algorithm = csr.signature_hash_algorithm
    except Exception as exc:  # cryptography raises several types for unknown algorithms
        raise RefusedRequest(
            "weak-hash", f"the request's signature algorithm is not one we check: {exc}"
        ) from exc
    # The hash first: a SHA-1 signature does not even verify here, and "weak" says why.
    if not isinstance(algorithm, _STRONG_HASHES):
        raise RefusedRequest(
            "weak-hash",
            f"expected a request signed with SHA-256 or stronger, got "
            f"{getattr(algorithm, 'name', algorithm)}",
            hint=_HINT,
        )
    if not csr.is_signature_valid:
        raise RefusedRequest(
            "bad-signature",
            "the request's signature does not verify with the key it carries: it was altered "
            "after it was made, or made without that key",
            hint=_HINT,
        )
    _check_subject(csr, device_id)
    return CheckedRequest(device_id, key, _ignored_extensions(csr))


def _describe(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"an RSA {key.key_size}-bit key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an ECDSA key on {key.curve.name}"
    return f"a {type(key).__name__.removeprefix('_')} key"


def _check_subject(csr: x509.CertificateSigningRequest, device_id: str) -> None:
    attributes = list(csr.subject)
    common_names = [a.value for a in attributes if a.oid == NameOID.COMMON_NAME]
    if common_names != [device_id]:
        got = ", ".join(repr(v) for v in common_names) or "none"
        raise RefusedRequest(
            "wrong-cn",
            f"expected a request for CN {device_id!r} (the device id being issued), got CN {got}",
            hint="the request names another device: issue that id, or make a new request on "
            "this device with --device-id",
        )
    others = [a.oid.dotted_string for a in attributes if a.oid != NameOID.COMMON_NAME]
    if others:
        raise RefusedRequest(
            "wrong-cn",
            f"expected a subject of the CN alone, got other attributes too ({', '.join(others)})",
            hint=_HINT,
        )


def _ignored_extensions(csr: x509.CertificateSigningRequest) -> tuple[str, ...]:
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise RefusedRequest(
            "malformed", f"the request's extensions cannot be read: {exc}", hint=_HINT
        ) from exc
    ignored = []
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise RefusedRequest(
                "ca-requested",
                "the request asks to be a certificate authority (basicConstraints CA:TRUE); "
                "a device gets a client certificate only",
                hint="a device key must never issue certificates: check where this request "
                "came from",
            )
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise RefusedRequest(
                "ca-requested",
                "the request asks for keyCertSign or cRLSign, the key usages of a certificate "
                "authority; a device gets digitalSignature only",
                hint="a device key must never issue certificates: check where this request "
                "came from",
            )
        known = not isinstance(value, x509.UnrecognizedExtension)
        ignored.append(type(value).__name__ if known else extension.oid.dotted_string)
    return tuple(ignored)
