"""The fleet directory's keys and roots across rotations, and the two steps of a rotation.

Files a rotation adds (nothing is deleted: a rotated-out key stays until the operator
removes it, and is harmless once the new root is published)::

    DIR/keys/root-N.pem, targets-N.pem     OFFLINE: the new root or targets keys (0600)
    DIR/control/keys/director-N.pem        the new director key: copy it to the control
                                           plane's keys_dir before publishing (0600)
    DIR/roots/N.root.json                  every root version signed here after the first
    DIR/root.json                          the newest root the control plane accepted: what
                                           new enrollment bundles carry (caught up at every
                                           publish, even one with nothing to send)

:func:`rotate` is ``edgelm provision rotate-keys`` (offline: new keys, the next root, signed);
:func:`publish` is ``edgelm fleet keys publish`` (the roots the control plane lacks, in order,
each with the targets re-signed if its targets keys changed). The decisions are in
:mod:`edgelm_provisioning.key_rotation`; this module reads and writes the files around them.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, Root, Targets
from tuf.api.serialization.json import JSONSerializer

from edgelm_protocol.repository.atomic_file import write_atomic
from edgelm_protocol.repository.writer import generate_key, load_key
from edgelm_provisioning.errors import ControlProtocolError, FleetDirError, InvalidValue
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.key_rotation import (
    ROTATABLE_ROLES,
    check_rotation,
    listed,
    new_key_count,
    next_root,
    require_threshold,
    resign_targets,
    rotation_summary,
    sign_root,
    targets_verify,
)
from edgelm_provisioning.repository_check import VerifiedRepository

ROOTS_DIR = "roots"
PUBLIC_FILE = 0o644
_SERIALIZER = JSONSerializer(compact=False)
_ROOT_FILE = re.compile(r"([0-9]+)\.root\.json")


def held_keys(keys_dir: Path, role: str) -> list[tuple[Path, Signer]]:
    """Every ``<role>-N.pem`` in ``keys_dir``, oldest index first."""
    found = []
    for path in keys_dir.glob(f"{role}-*.pem"):
        index = path.stem.removeprefix(f"{role}-")
        if index.isdigit():
            found.append((int(index), path))
    return [(path, load_key(path)) for _, path in sorted(found)]


def _next_index(keys_dir: Path, stem: str) -> int:
    used = [
        int(p.stem.removeprefix(f"{stem}-"))
        for p in keys_dir.glob(f"{stem}-*.pem")
        if p.stem.removeprefix(f"{stem}-").isdigit()
    ]
    return max(used, default=0) + 1


def _public_pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class FleetRoots:
    """The root versions of one fleet directory."""

    def __init__(self, fleet: FleetDir) -> None:
        self.fleet = fleet
        self.dir = fleet.paths.root / ROOTS_DIR

    def _files(self) -> dict[int, Path]:
        files = {}
        if self.dir.is_dir():
            for path in self.dir.iterdir():
                match = _ROOT_FILE.fullmatch(path.name)
                if match:
                    files[int(match.group(1))] = path
        return files

    def _load(self, path: Path) -> Metadata[Root]:
        try:
            return Metadata[Root].from_file(str(path))
        except Exception as exc:  # python-tuf raises several unrelated types for bad metadata
            raise FleetDirError(
                "fleet-dir-root-unreadable",
                self.fleet.paths.root,
                f"{path} is not TUF root metadata: {exc}",
                hint="restore it from your backup of the fleet directory",
            ) from exc

    def newest(self) -> Metadata[Root]:
        """The newest root signed here (DIR/roots), or the fleet's first (DIR/root.json)."""
        bundled = self._load(self.fleet.require(self.fleet.paths.root_json, "the fleet's root"))
        files = self._files()
        if not files or max(files) <= bundled.signed.version:
            return bundled
        return self._load(files[max(files)])

    def after(self, version: int) -> list[Metadata[Root]]:
        """The roots signed here above ``version``, which must follow it without a gap."""
        files = self._files()
        wanted = sorted(v for v in files if v > version)
        if wanted and wanted != list(range(version + 1, version + 1 + len(wanted))):
            raise FleetDirError(
                "fleet-dir-root-missing",
                self.dir,
                f"the control plane is at root v{version}, and {self.dir} has "
                f"{', '.join(f'v{v}' for v in wanted)}: v{version + 1} is missing",
                hint="restore the missing root from your backup of the fleet directory",
            )
        return [self._load(files[v]) for v in wanted]

    def save(self, root: Metadata[Root]) -> Path:
        self.dir.mkdir(mode=0o755, exist_ok=True)
        path = self.dir / f"{root.signed.version}.root.json"
        write_atomic(path, root.to_bytes(_SERIALIZER), mode=PUBLIC_FILE)
        return path

    def set_bundle_root(self, root: Metadata[Root]) -> None:
        """New enrollment bundles carry this root from now on."""
        write_atomic(self.fleet.paths.root_json, root.to_bytes(_SERIALIZER), mode=PUBLIC_FILE)

    def catch_up_bundle_root(self, accepted: Metadata[Root]) -> bool:
        """``accepted`` (verified from DIR/root.json) replaces DIR/root.json if it is newer;
        True if it did."""
        bundled = self._load(self.fleet.require(self.fleet.paths.root_json, "the fleet's root"))
        if accepted.signed.version <= bundled.signed.version:
            return False
        self.set_bundle_root(accepted)
        return True


@dataclass(frozen=True)
class Rotation:
    role: str
    root_version: int
    root_file: Path
    new_keys: tuple[Path, ...]
    summary: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "root_version": self.root_version,
            "root_file": str(self.root_file),
            "new_keys": [str(p) for p in self.new_keys],
            **self.summary,
        }


def rotate(fleet: FleetDir, role: str, *, now: datetime.datetime) -> Rotation:
    """New keys for ``role`` and root version N + 1, signed; nothing leaves this machine."""
    if role not in ROTATABLE_ROLES:
        raise InvalidValue(
            "role", f"role must be one of {', '.join(ROTATABLE_ROLES)}, got {role!r}"
        )
    roots = FleetRoots(fleet)
    current = roots.newest()
    keys_dir = fleet.paths.keys_dir
    old_root_keys = listed(current.signed, Root.type, [s for _, s in held_keys(keys_dir, "root")])
    require_threshold(current.signed, Root.type, old_root_keys, str(keys_dir))
    count = new_key_count(current.signed, role)
    made: list[Path] = []
    new_signers: list[Signer] = []
    if role == "director":
        control_keys = fleet.paths.control_keys_dir
        path = control_keys / f"director-{_next_index(control_keys, 'director')}.pem"
        generate_key(path)
        made.append(path)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        new = next_root(current.signed, role, now=now, director_pems=[_public_pem(key)])
    else:
        for _ in range(count):
            path = keys_dir / f"{role}-{_next_index(keys_dir, role)}.pem"
            new_signers.append(generate_key(path))
            made.append(path)
        new = next_root(current.signed, role, now=now, tuf_keys=[s.public_key for s in new_signers])
    signers = old_root_keys + (new_signers if role == Root.type else [])
    signed = sign_root(new, signers)
    check_rotation(current.signed, signed)
    path = roots.save(signed)
    return Rotation(role, new.version, path, tuple(made), rotation_summary(current.signed, new))


@dataclass
class Published:
    root_version: int
    targets_version: int | None
    answers: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "root_version": self.root_version,
            "targets_version": self.targets_version,
            "published": self.answers,
        }


Poster = Callable[[dict[str, Any]], Any]


def publish(
    fleet: FleetDir,
    verified: VerifiedRepository,
    post: Poster,
    *,
    now: datetime.datetime,
) -> Published:
    """Push every root signed here that the control plane (at ``verified``) lacks, in order;
    re-sign the targets with a root whose targets keys changed. ``post`` sends one body to
    ``POST /api/v1/repository/root`` and returns the answer."""
    roots = FleetRoots(fleet)
    # A root the control plane accepted in a run that never heard its answer has nothing left
    # to send: DIR/root.json catches up here, or new bundles would carry a retired key.
    roots.catch_up_bundle_root(verified.root)
    previous = verified.root.signed
    targets = verified.targets
    result = Published(previous.version, None)
    for root in roots.after(previous.version):
        check_rotation(previous, root)
        body: dict[str, Any] = {"root": root.to_dict(), "targets": None}
        if not targets_verify(root.signed, targets):
            held = [s for _, s in held_keys(fleet.paths.keys_dir, Targets.type)]
            signers = listed(root.signed, Targets.type, held)
            require_threshold(root.signed, Targets.type, signers, str(fleet.paths.keys_dir))
            targets = resign_targets(targets, signers, now=now)
            body["targets"] = targets.to_dict()
            result.targets_version = targets.signed.version
        answer = post(body)
        if not isinstance(answer, dict) or answer.get("root_version") != root.signed.version:
            raise ControlProtocolError(
                f"the control plane answered {json.dumps(answer)[:200]} to root "
                f"v{root.signed.version}",
                url="/api/v1/repository/root",
            )
        result.answers.append(answer)
        result.root_version = root.signed.version
        roots.set_bundle_root(root)
        previous = root.signed
    return result


def check_published(verified: VerifiedRepository, expected_root: int) -> None:
    """The repository as devices now see it must be at the root just published."""
    if verified.root.signed.version != expected_root:
        raise InvalidValue(
            "root",
            f"the control plane accepted root v{expected_root} but its repository serves "
            f"v{verified.root.signed.version}",
            hint="see the control plane's log, then run edgelm fleet keys publish again",
        )
