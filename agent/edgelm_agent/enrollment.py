"""A device's place in a fleet: the enrollment bundle an operator issued, installed on the device.

``edgelm provision device ID`` writes the bundle on the operator's machine; ``edgelm agent
enroll BUNDLE`` installs it here, under ``<state_dir>/fleet/``, with the agent stopped. From
then on ``edgelm agent run --state-dir DIR`` is a fleet device: it syncs with the fleet's broker
and installs models only from the fleet's TUF repository, with no further flags.

Enrolling replaces the device's trust root, explicitly and with a log line
(``trust_root_replaced``): a standalone device trusted the keys it made itself; a fleet device
trusts the fleet's root and nothing else. So the models a standalone device installed are kept
only if the fleet's signed metadata lists them, with the same length and hash; the others are
forgotten (their files stay on disk until ``gc``, and a model the fleet sends later with the
same hash is never fetched again). When the fleet's repository cannot be reached at enrollment,
none can be checked, so none is kept: trust is never assumed.

The bundle's ``director_keys`` are the director keys the device trusts until a verified TUF
root names others (a director key rotation, see :mod:`edgelm_protocol.root_director`). Those
are kept in ``<state_dir>/fleet/director-keys.json`` with the version of the root that named
them, so a restart keeps them and only a newer root replaces them; enrolling again removes
the file (a new trust root, a new start).

A bundle of a fleet with a CA carries ``tls``: the fleet CA, this device's certificate (CN =
its id) and its key. They are written beside the enrollment, 0600, under
``<state_dir>/fleet/tls/``; the sync service then speaks ``mqtts://`` with the fleet CA as its
only trust anchor and the certificate as its identity. Such a device never speaks plain
``mqtt://`` to a broker that is not on the same machine, nor plain ``http://`` to a fleet
repository that is not: the bundle is refused at enrollment, and the settings at start. An
``https://`` fleet repository is verified against the fleet CA alone, never the system's
trust store (:func:`fleet_repository_mirror`).

``tls.ca`` may hold several certificates (bundles from this version hold one: the CA that
issued the certificate). The certificate must be issued (signed) by one of them. Enrolling
replaces ``ca.pem`` whole, so a device drops a CA (the previous one, after a CA rotation) by
enrolling a bundle issued without it.

``tls`` without ``key`` is the answer to a request the device made itself
(``edgelm agent enroll --csr``, :mod:`edgelm_agent.enrollment_key`): the key never left the
device, and enrolling pairs the certificate with it.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from tuf.api.metadata import Metadata, Root

from edgelm_agent.errors import ConfigError
from edgelm_agent.registry.mirrors import PinnedMirror
from edgelm_protocol.errors import InvalidId, InvalidKey
from edgelm_protocol.ids import check_device_id, check_fleet_id
from edgelm_protocol.mqtt.broker_url import parse_broker_url
from edgelm_protocol.mqtt.errors import InvalidBrokerUrl
from edgelm_protocol.mqtt.settings import is_loopback, require_tls_unless_loopback
from edgelm_protocol.repository.atomic_file import write_atomic
from edgelm_protocol.signing import DirectorKeys

log = structlog.get_logger(__name__)

BUNDLE_FORMAT = "edgelm-enrollment/1"
FLEET_DIR = "fleet"
ENROLLMENT_FILE = "enrollment.json"
ROOT_FILE = "root.json"
TLS_DIR = "tls"
TLS_CA_FILE = "ca.pem"
TLS_CERT_FILE = "client.pem"
TLS_KEY_FILE = "client-key.pem"
DIRECTOR_KEYS_FILE = "director-keys.json"
_URL = re.compile(r"(https?|mqtts?)://[^\s/]+.*")


class EnrollmentError(ConfigError):
    """The bundle is not one this agent can install; nothing was changed."""

    code = "enrollment_invalid"


@dataclass(frozen=True)
class Enrollment:
    """What a fleet device knows about its fleet, from its bundle."""

    fleet: str
    device_id: str
    hardware_class: str
    broker_url: str
    control_url: str
    repository_url: str
    director_keys: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)
    broker_username: str | None = None
    broker_password: str | None = field(default=None, repr=False)
    issued_at: int = 0
    #: The fleet CA (the one that issued the certificate), this device's certificate and key (PEM),
    #: from the bundle's ``tls``. ``tls_key`` is ``None`` in a bundle answering the device's
    #: own request until :func:`edgelm_agent.enrollment_key.pair_pending_key` fills it in.
    tls_ca: str | None = field(default=None, repr=False)
    tls_cert: str | None = field(default=None, repr=False)
    tls_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_bundle(cls, data: Any) -> Enrollment:
        """Check a bundle's fields; every fault names the field."""
        if not isinstance(data, dict):
            raise EnrollmentError("an enrollment bundle is a JSON object")
        if data.get("format") != BUNDLE_FORMAT:
            raise EnrollmentError(
                f"bundle format must be {BUNDLE_FORMAT!r}, got {data.get('format')!r}"
            )
        try:
            fleet = check_fleet_id(data.get("fleet"))
            device_id = check_device_id(data.get("device_id"))
        except InvalidId as exc:
            raise EnrollmentError(f"bundle: {exc}") from exc
        broker = data.get("broker")
        if not isinstance(broker, dict):
            raise EnrollmentError("bundle: 'broker' must be an object with 'url'")
        labels = data.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise EnrollmentError("bundle: 'labels' must map strings to strings")
        keys = data.get("director_keys")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise EnrollmentError("bundle: 'director_keys' must be a list of PEM public keys")
        try:
            DirectorKeys.from_pem([k.encode() for k in keys])
        except (InvalidKey, ValueError) as exc:
            raise EnrollmentError(f"bundle: a director key is not usable: {exc}") from exc
        tls_ca, tls_cert, tls_key = _tls(data.get("tls"), device_id)
        broker_url = _broker_url(broker)
        repository_url = _url(data, "repository_url", "repository_url")
        if tls_ca is not None:
            _refuse_plain_remote(broker_url)
            _refuse_plain_repository(repository_url)
        return cls(
            fleet=fleet,
            device_id=device_id,
            hardware_class=_text(data, "hardware_class"),
            broker_url=broker_url,
            control_url=_url(data, "control_url", "control_url"),
            repository_url=repository_url,
            director_keys=tuple(keys),
            labels=dict(labels),
            broker_username=_optional_text(broker, "username", "broker.username"),
            broker_password=_optional_text(broker, "password", "broker.password"),
            issued_at=int(data.get("issued_at") or 0),
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )

    def to_json(self) -> dict[str, Any]:
        tls = (
            {}
            if self.tls_ca is None
            else {"tls": {"ca": self.tls_ca, "cert": self.tls_cert, "key": self.tls_key}}
        )
        return tls | {
            "format": BUNDLE_FORMAT,
            "fleet": self.fleet,
            "device_id": self.device_id,
            "hardware_class": self.hardware_class,
            "labels": self.labels,
            "broker": {
                "url": self.broker_url,
                "username": self.broker_username,
                "password": self.broker_password,
            },
            "control_url": self.control_url,
            "repository_url": self.repository_url,
            "director_keys": list(self.director_keys),
            "issued_at": self.issued_at,
        }

    def director(self) -> DirectorKeys:
        return DirectorKeys.from_pem([k.encode() for k in self.director_keys])


def _tls(value: Any, device_id: str) -> tuple[str | None, str | None, str | None]:
    """The bundle's optional ``tls``: CA bundle, certificate and key (``None`` when the
    device made its own), each checked, or all None."""
    if value is None:
        return None, None, None
    key_pem = value.get("key") if isinstance(value, dict) else None
    if (
        not isinstance(value, dict)
        or not all(isinstance(value.get(k), str) for k in ("ca", "cert"))
        or not isinstance(key_pem, str | None)
    ):
        raise EnrollmentError(
            "bundle: 'tls' must be an object with PEM 'ca' and 'cert', and 'key' unless the "
            "device made its own key"
        )
    try:
        cas = x509.load_pem_x509_certificates(value["ca"].encode())
        cert = x509.load_pem_x509_certificate(value["cert"].encode())
        key = (
            None
            if key_pem is None
            else serialization.load_pem_private_key(key_pem.encode(), password=None)
        )
    except ValueError as exc:
        raise EnrollmentError(f"bundle: 'tls' holds a malformed PEM: {exc}") from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [device_id]:
        raise EnrollmentError(
            f"bundle: the certificate in 'tls' is not {device_id!r}'s (its CN is "
            f"{', '.join(str(n.value) for n in names) or 'missing'})"
        )
    if not any(_issued_by(cert, ca) for ca in cas):
        raise EnrollmentError("bundle: the certificate in 'tls' is not issued by its 'ca'")
    if key is not None and public_key_der(key.public_key()) != public_key_der(cert.public_key()):
        raise EnrollmentError("bundle: the key in 'tls' does not belong to its certificate")
    return value["ca"], value["cert"], key_pem


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert``: by signature, not by name (during a CA rotation the
    old and the new CA have the same name)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def public_key_der(key: Any) -> bytes:
    """A public key's SubjectPublicKeyInfo, DER: what two keys are compared by."""
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _refuse_plain_remote(broker_url: str) -> None:
    try:
        broker = parse_broker_url(broker_url)
        if not broker.tls:
            require_tls_unless_loopback(broker.host, what="'broker.url'")
    except ValueError as exc:
        raise EnrollmentError(f"bundle: {exc}") from exc


def _refuse_plain_repository(repository_url: str) -> None:
    parts = urllib.parse.urlsplit(repository_url)
    if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
        raise EnrollmentError(
            f"bundle: 'repository_url' is http:// (plain) to {parts.hostname}, which is not a "
            "loopback address; the fleet has a CA, so the repository must be https:// (with "
            "the control plane's certificate from the fleet CA)"
        )


def fleet_repository_mirror(state_dir: Path, enrollment: Enrollment) -> str:
    """The fleet's repository as a mirror: ``https://`` pinned to the fleet CA of the
    enrollment (``<state_dir>/fleet/tls/ca.pem``), so no certificate from the system's trust
    store can stand in for the fleet's server; otherwise the plain URL."""
    if enrollment.tls_ca is not None and enrollment.repository_url.startswith("https://"):
        return PinnedMirror(enrollment.repository_url, tls_files(state_dir)[0])
    return enrollment.repository_url


def tls_files(state_dir: Path) -> tuple[Path, Path, Path]:
    """Where the enrollment's CA, certificate and key are: ``<state_dir>/fleet/tls/``."""
    folder = fleet_dir(state_dir) / TLS_DIR
    return folder / TLS_CA_FILE, folder / TLS_CERT_FILE, folder / TLS_KEY_FILE


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > 64:
        raise EnrollmentError(f"bundle: {key!r} must be a string of 1-64 characters")
    return value


def _optional_text(data: dict[str, Any], key: str, shown: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise EnrollmentError(f"bundle: {shown!r} must be a string")
    return value


def _url(data: dict[str, Any], key: str, shown: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not _URL.fullmatch(value):
        raise EnrollmentError(f"bundle: {shown!r} must be a URL, got {value!r}")
    return value.rstrip("/")


def _broker_url(broker: dict[str, Any]) -> str:
    # The same parser the sync service connects with, so a bundle it cannot use is
    # refused at enrollment, not found out at the first connection.
    value = _url(broker, "url", "broker.url")
    try:
        parse_broker_url(value)
    except InvalidBrokerUrl as exc:
        raise EnrollmentError(f"bundle: 'broker.url': {exc}") from exc
    return value


@dataclass(frozen=True)
class LearnedDirectorKeys:
    """Director keys (PEM) a verified root named, and that root's version."""

    root_version: int
    keys: tuple[str, ...]

    def director(self) -> DirectorKeys:
        return DirectorKeys.from_pem([k.encode() for k in self.keys])


def read_learned_director_keys(state_dir: Path) -> LearnedDirectorKeys | None:
    """The director keys learned from a verified root, or ``None`` (none learned yet).

    A file that cannot be used is reported and treated as absent: the next verified refresh
    writes it again, and until then the bundle's keys (older, never weaker) stand.
    """
    path = fleet_dir(state_dir) / DIRECTOR_KEYS_FILE
    try:
        data = json.loads(path.read_bytes())
        learned = LearnedDirectorKeys(int(data["root_version"]), tuple(data["keys"]))
        if not all(isinstance(k, str) for k in learned.keys):
            raise TypeError("keys must be PEM strings")
        learned.director()
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, InvalidKey) as exc:
        log.warning("director_keys_unreadable", path=str(path), error=str(exc)[:300])
        return None
    return learned


def write_learned_director_keys(state_dir: Path, learned: LearnedDirectorKeys) -> None:
    learned.director()  # never persist what could not be read back
    body = {"root_version": learned.root_version, "keys": list(learned.keys)}
    write_atomic(
        fleet_dir(state_dir) / DIRECTOR_KEYS_FILE, json.dumps(body, indent=2).encode(), mode=0o640
    )


def fleet_dir(state_dir: Path) -> Path:
    return state_dir / FLEET_DIR


def load_enrollment(state_dir: Path) -> Enrollment | None:
    """The enrollment installed in ``state_dir``, or ``None`` for a standalone device."""
    path = fleet_dir(state_dir) / ENROLLMENT_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return Enrollment.from_bundle(json.loads(raw))
    except (ValueError, EnrollmentError) as exc:
        raise ConfigError(f"{path} is not a valid enrollment: {exc}") from exc


def read_bundle(path: Path) -> tuple[Enrollment, bytes]:
    """The bundle's enrollment and the fleet's root metadata, checked, changing nothing."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise EnrollmentError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise EnrollmentError(f"{path} is not JSON: {exc}") from exc
    enrollment = Enrollment.from_bundle(data)
    root = data.get("root") if isinstance(data, dict) else None
    if not isinstance(root, dict):
        raise EnrollmentError("bundle: 'root' must be the fleet's root metadata (a JSON object)")
    root_bytes = json.dumps(root, indent=1, sort_keys=True).encode()
    try:
        metadata = Metadata[Root].from_bytes(root_bytes)
        metadata.verify_delegate(Root.type, metadata)  # signed by its own keys
    except Exception as exc:  # python-tuf raises several unrelated types for bad metadata
        raise EnrollmentError(f"bundle: 'root' is not valid TUF root metadata: {exc}") from exc
    return enrollment, root_bytes


def write_enrollment(state_dir: Path, enrollment: Enrollment, root_bytes: bytes) -> Path:
    """Write the enrollment (0600: it holds the broker password) and the fleet's root."""
    if enrollment.tls_ca is not None and enrollment.tls_key is None:
        raise EnrollmentError(
            "the bundle's certificate has no key: pair it with the key made by "
            "`edgelm agent enroll --csr` first"
        )
    folder = fleet_dir(state_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Keys learned under the previous enrollment's root are not this bundle's to trust.
    (folder / DIRECTOR_KEYS_FILE).unlink(missing_ok=True)
    write_atomic(folder / ROOT_FILE, root_bytes, mode=0o640)
    if enrollment.tls_ca is not None:
        tls_dir = folder / TLS_DIR
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        tls_dir.chmod(0o700)
        ca, cert, key = tls_files(state_dir)
        for path, pem in (
            (ca, enrollment.tls_ca),
            (cert, enrollment.tls_cert),
            (key, enrollment.tls_key),
        ):
            write_atomic(path, (pem or "").encode(), mode=0o600)
    write_atomic(
        folder / ENROLLMENT_FILE, json.dumps(enrollment.to_json(), indent=2).encode(), mode=0o600
    )
    return folder
