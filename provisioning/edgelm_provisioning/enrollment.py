"""Device identities: enrollment bundles (with secrets) and the inventory (without).

``edgelm provision device ID`` writes one bundle, read by ``edgelm agent enroll BUNDLE``::

    {"format": "edgelm-enrollment/1", "fleet": "acme", "device_id": "kiosk-17",
     "hardware_class": "pi5", "labels": {"site": "berlin"},
     "broker": {"url": "mqtt://broker.example:1883", "username": "kiosk-17",
                "password": "<random>"},
     "control_url": "http://cp.example:8480",
     "repository_url": "http://cp.example:8480/repository",
     "root": {...the fleet's root.json...}, "director_keys": ["-----BEGIN PUBLIC KEY-----\\n..."],
     "tls": {"ca": "<fleet CA PEM>", "cert": "<device certificate PEM>", "key": "<its key PEM>"},
     "issued_at": 1795344276}

``tls`` is there when the fleet has a CA (:mod:`edgelm_provisioning.fleet_ca`); a bundle
without it (made before, or for a fleet without a CA) stays valid. ``tls.ca`` is the fleet
CA that issued the certificate, alone: during a CA rotation the new CA, so the device stops
trusting the previous one when it enrolls the bundle. A device that made
its own key (``edgelm agent enroll --csr``) gets a bundle issued from its request
(``issue_device(..., csr=...)``): ``tls`` has no ``key``, the device pairs the certificate
with the key it kept.

and one inventory record ``DIR/devices/ID.json``: id, hardware class, labels, times. The
bundle is written 0600 (it holds the broker password); the record holds no secret, so the
inventory can be shared and backed up freely.

Device ids become MQTT topic levels, broker usernames, ACL patterns and file names, so they
pass :func:`edgelm_protocol.ids.check_device_id` (refusing ``+ # /``, ``$``, NUL, control
characters and the reserved ``control``: the CVE-2017-7650 class, where a client id or user
name holding a wildcard escaped its ACL pattern). Two ids that differ only by case are refused
as well: a case-insensitive file system (the operator's laptop) would give them one record.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgelm_protocol.errors import InvalidId
from edgelm_protocol.ids import ID_PATTERN, check_device_id
from edgelm_protocol.repository.atomic_file import write_atomic
from edgelm_protocol.root_director import DIRECTOR_KEYS_FIELD
from edgelm_provisioning.csr import CheckedRequest, check_csr
from edgelm_provisioning.errors import AlreadyIssued, FleetDirError, InvalidValue, NotIssued
from edgelm_provisioning.fleet_ca import (
    DEFAULT_CLIENT_DAYS,
    FleetCa,
    ca_exists,
    check_days,
    issue_device_identity,
)
from edgelm_provisioning.fleet_dir import FleetDir

BUNDLE_FORMAT = "edgelm-enrollment/1"
HARDWARE_CLASSES = ("pi4", "pi5", "jetson", "x86")
MAX_LABELS = 64
LABEL_VALUE_MAX_CHARS = 256
PASSWORD_BYTES = 32
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # controls, lone surrogates


def checked_device_id(device_id: str) -> str:
    try:
        return check_device_id(device_id)
    except InvalidId as exc:
        raise InvalidValue(
            "device_id",
            str(exc),
            hint="device ids become MQTT topic levels and broker user names: "
            "+ # / $ NUL, spaces and control characters would let one escape its ACL",
        ) from exc


def checked_hardware_class(hardware_class: str) -> str:
    if hardware_class not in HARDWARE_CLASSES:
        raise InvalidValue(
            "class",
            f"hardware class must be one of {', '.join(HARDWARE_CLASSES)}, got {hardware_class!r}",
        )
    return hardware_class


def parse_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` → ``(key, value)``; the value may be empty and may hold ``=``."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidValue("label", f"a label is KEY=VALUE, got {text!r}")
    return check_label(key, value)


def check_label(key: str, value: str) -> tuple[str, str]:
    """Keys are rollout selectors (the id alphabet); values are short printable text."""
    if not isinstance(key, str) or not ID_PATTERN.fullmatch(key):
        raise InvalidValue(
            "label",
            f"a label key must be 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit, "
            f"got {key!r}",
        )
    if (
        not isinstance(value, str)
        or len(value) > LABEL_VALUE_MAX_CHARS
        or _UNPRINTABLE.search(value)
    ):
        raise InvalidValue(
            "label",
            f"label {key}'s value must be text of at most {LABEL_VALUE_MAX_CHARS} characters "
            f"without control characters, got {value!r}",
        )
    return key, value


def labels_from_cli(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Repeated ``--label KEY=VALUE`` options; a key given twice is a mistake, not an update."""
    labels: dict[str, str] = {}
    for item in items:
        key, value = parse_label(item)
        if key in labels:
            raise InvalidValue("label", f"label {key!r} is given twice")
        labels[key] = value
    if len(labels) > MAX_LABELS:
        raise InvalidValue("label", f"at most {MAX_LABELS} labels, got {len(labels)}")
    return labels


@dataclass(frozen=True)
class DeviceRecord:
    """``DIR/devices/ID.json``: what provisioning issued, and when. No secrets."""

    id: str
    hardware_class: str
    labels: Mapping[str, str]
    issued_at: int
    first_issued_at: int
    issue_count: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "hardware_class": self.hardware_class,
            "labels": dict(self.labels),
            "issued_at": self.issued_at,
            "first_issued_at": self.first_issued_at,
            "issue_count": self.issue_count,
        }

    @classmethod
    def load(cls, path: Path) -> DeviceRecord:
        try:
            data = json.loads(path.read_bytes())
            return cls(
                id=str(data["id"]),
                hardware_class=str(data["hardware_class"]),
                labels={str(k): str(v) for k, v in data["labels"].items()},
                issued_at=int(data["issued_at"]),
                first_issued_at=int(data.get("first_issued_at", data["issued_at"])),
                issue_count=int(data.get("issue_count", 1)),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidValue(str(path), f"{path} is not a device record: {exc}") from exc


@dataclass(frozen=True)
class IssuedDevice:
    record: DeviceRecord
    bundle: dict[str, Any]
    bundle_path: Path
    reissued: bool
    #: Set when the certificate was issued for the device's own request (``--csr``).
    request: CheckedRequest | None = None

    def as_dict(self) -> dict[str, Any]:
        """What the CLI prints: the record and where the bundle is; never the password."""
        tls = self.bundle.get("tls")
        return {
            "device": self.record.as_dict(),
            "bundle": str(self.bundle_path),
            "reissued": self.reissued,
            "broker_username": self.bundle["broker"]["username"],
            "key_in_bundle": isinstance(tls, dict) and "key" in tls,
            "from_csr": self.request is not None,
            "ignored_csr_extensions": []
            if self.request is None
            else list(self.request.ignored_extensions),
        }


def director_public_pem(private_key_path: Path) -> str:
    """The director's public key, PEM (SubjectPublicKeyInfo), from its private key file."""
    private = serialization.load_pem_private_key(private_key_path.read_bytes(), password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise InvalidValue(str(private_key_path), f"{private_key_path} is not an Ed25519 key")
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def build_bundle(
    fleet: FleetDir,
    record: DeviceRecord,
    *,
    password: str,
    root: dict[str, Any],
    director_keys: list[str],
    tls: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The bundle's JSON object, field by field as docs/fleet.md documents it."""
    config = fleet.config
    bundle = {
        "format": BUNDLE_FORMAT,
        "fleet": config.fleet,
        "device_id": record.id,
        "hardware_class": record.hardware_class,
        "labels": dict(record.labels),
        "broker": {"url": config.broker_url, "username": record.id, "password": password},
        "control_url": config.control_url,
        "repository_url": config.repository_url,
        "root": root,
        "director_keys": director_keys,
        "issued_at": record.issued_at,
    }
    if tls is not None:
        bundle["tls"] = tls
    return bundle


def _case_clash(fleet: FleetDir, device_id: str) -> str | None:
    if not fleet.paths.devices_dir.is_dir():
        return None
    for existing in fleet.paths.devices_dir.glob("*.json"):
        other = existing.name.removesuffix(".json")
        if other != device_id and other.lower() == device_id.lower():
            return other
    return None


def _is_bundle_of(path: Path, device_id: str) -> bool:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("format") == BUNDLE_FORMAT
        and data.get("device_id") == device_id
    )


def issue_device(
    fleet: FleetDir,
    device_id: str,
    *,
    hardware_class: str | None,
    labels: Mapping[str, str] | None,
    out: Path,
    reissue: bool,
    now: int,
    cert_days: int = DEFAULT_CLIENT_DAYS,
    csr: bytes | None = None,
) -> IssuedDevice:
    """Issue (or, with ``reissue``, replace) a device's identity and write its bundle.

    With ``csr`` (a PKCS#10 request the device made with ``edgelm agent enroll --csr``) the
    certificate is for the request's key, checked by :func:`edgelm_provisioning.csr.check_csr`
    before anything is written, and the bundle carries no key.

    A reissue makes a new broker password (the old bundle stops working once the broker's
    password file is regenerated) and keeps the device's class and labels unless new ones
    are given. ``out`` is never overwritten, except by a reissue over that same device's
    previous bundle. When the fleet has a CA the bundle carries a new key and certificate
    (CN = ``device_id``, valid ``cert_days``); a reissue revokes the device's earlier ones.
    """
    device_id = checked_device_id(device_id)
    check_days(cert_days)
    request = None if csr is None else check_csr(csr, device_id)
    if hardware_class is not None:
        checked_hardware_class(hardware_class)
    if labels is not None:
        if len(labels) > MAX_LABELS:
            raise InvalidValue("label", f"at most {MAX_LABELS} labels, got {len(labels)}")
        labels = dict(check_label(k, v) for k, v in labels.items())
    paths = fleet.paths
    record_path = paths.device_record(device_id)
    clash = _case_clash(fleet, device_id)
    if clash is not None:
        raise AlreadyIssued(
            "device",
            device_id,
            f"device {clash!r} exists; ids that differ only by case are refused",
            hint="a case-insensitive file system would store both as one record",
        )
    previous = DeviceRecord.load(record_path) if record_path.exists() else None
    if previous is not None and not reissue:
        raise AlreadyIssued(
            "device",
            device_id,
            f"device {device_id!r} was issued already, on "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(previous.issued_at))}",
            hint="--reissue makes a new bundle with new broker credentials",
        )
    if previous is None and reissue:
        raise NotIssued(
            "device", device_id, f"device {device_id!r} was never issued; nothing to reissue"
        )
    if out.exists() and not (reissue and _is_bundle_of(out, device_id)):
        raise AlreadyIssued(
            "bundle",
            str(out),
            f"{out} exists; refusing to overwrite it",
            hint="bundles hold credentials: choose a new --out path, or remove the old file",
        )
    if previous is None:
        if hardware_class is None:
            raise InvalidValue(
                "class", f"give --class ({'|'.join(HARDWARE_CLASSES)}) for a new device"
            )
        record = DeviceRecord(device_id, hardware_class, dict(labels or {}), now, now)
    else:
        record = replace(
            previous,
            hardware_class=hardware_class or previous.hardware_class,
            labels=dict(labels) if labels is not None else dict(previous.labels),
            issued_at=now,
            issue_count=previous.issue_count + 1,
        )
    root = json.loads(fleet.require(paths.root_json, "the fleet's root.json").read_bytes())
    # After a director rotation the fleet's root names the director keys: the bundle says the
    # same (the device would take the root's anyway), not the retired director.pem.
    named = root.get("signed", {}).get(DIRECTOR_KEYS_FIELD) if isinstance(root, dict) else None
    directors = (
        [str(pem) for pem in named]
        if isinstance(named, list) and named
        else [director_public_pem(fleet.require(paths.director_key, "the director key"))]
    )
    ca = FleetCa.load(paths.root) if ca_exists(paths) else None
    if ca is None and request is not None:
        raise FleetDirError(
            "fleet-ca-missing",
            paths.root,
            "the fleet has no certificate authority to sign the request with",
            hint=f"create it with `edgelm provision ca-init --fleet-dir {paths.root}`",
        )
    tls = (
        None
        if ca is None
        else issue_device_identity(
            ca,
            device_id,
            now=now,
            days=cert_days,
            public_key=None if request is None else request.public_key,
        )
    )
    bundle = build_bundle(
        fleet,
        record,
        password=secrets.token_urlsafe(PASSWORD_BYTES),
        root=root,
        director_keys=directors,
        tls=tls,
    )
    write_atomic(out, (json.dumps(bundle, indent=2) + "\n").encode(), mode=0o600)
    write_atomic(record_path, (json.dumps(record.as_dict(), indent=2) + "\n").encode())
    if ca is not None and tls is not None and previous is not None:
        serial = x509.load_pem_x509_certificate(tls["cert"].encode()).serial_number
        ca.revoke(device_id, now=now, keep=serial)
    return IssuedDevice(record, bundle, out, reissued=previous is not None, request=request)
