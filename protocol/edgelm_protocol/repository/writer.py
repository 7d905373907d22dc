"""Create and sign a TUF repository in a folder, with python-tuf's metadata API.

A standalone device keeps such a repository with device-local keys, so a model imported by hand
takes exactly the same verification path as one published by a fleet. Tests use it to build the
remote repositories they attack. Layout (consistent snapshots, as TUF recommends for mirrors)::

    metadata/N.root.json  metadata/timestamp.json            1.root.json, then one per rotation
    metadata/N.snapshot.json  metadata/N.targets.json
    targets/models/NAME/VERSION/<sha256>.<file>          a GGUF model, or an ONNX bundle.json
    targets/models/NAME/VERSION/files/<sha256>           the members of an ONNX bundle
    keys/<role>.pem                                      private keys, mode 0600 (offline in a
                                                         fleet: root and targets stay with the
                                                         operator)
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from edgelm_protocol.repository.atomic_file import write_atomic

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
DEFAULT_EXPIRY = {  # how long each role's signature holds; timestamp is re-signed often
    Root.type: datetime.timedelta(days=365),
    Targets.type: datetime.timedelta(days=180),
    Snapshot.type: datetime.timedelta(days=30),
    Timestamp.type: datetime.timedelta(days=7),
}
_SERIALIZER = JSONSerializer(compact=False)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def generate_key(path: Path) -> CryptoSigner:
    """A new ed25519 key, written with mode 0600 before any byte of it is."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(path, pem, mode=0o600)
    return CryptoSigner(private)


def load_key(path: Path) -> CryptoSigner:
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return CryptoSigner(private)


class RepositoryWriter:
    """Holds the repository's signed metadata in memory and writes each change atomically."""

    def __init__(
        self,
        root_dir: Path,
        signers: dict[str, list[Signer]],
        metadata: dict[str, Metadata[Any]],
        *,
        held: dict[str, list[Signer]] | None = None,
    ) -> None:
        self.root_dir = root_dir
        self.metadata_dir = root_dir / "metadata"
        self.targets_dir = root_dir / "targets"
        self.signers = signers
        #: Every key at hand, listed by root or not: a new root may list one of them.
        self.held = held if held is not None else signers
        self.md = metadata
        self.expiry = dict(DEFAULT_EXPIRY)

    # --- creating and opening ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root_dir: Path,
        keys_dir: Path,
        *,
        threshold: int = 1,
        keys_per_role: int = 1,
        key_dirs: dict[str, Path] | None = None,
    ) -> RepositoryWriter:
        """A new repository with fresh keys, an empty target list, all metadata signed.

        Each role's keys go to ``key_dirs[role]`` if given, else to ``keys_dir``: a fleet
        keeps root and targets keys with the operator and gives snapshot and timestamp to
        the control plane.
        """
        where = key_dirs or {}
        signers: dict[str, list[Signer]] = {
            role: [
                generate_key(where.get(role, keys_dir) / f"{role}-{i}.pem")
                for i in range(keys_per_role)
            ]
            for role in ROLES
        }
        now = _now()
        root = Root(expires=now + DEFAULT_EXPIRY[Root.type], consistent_snapshot=True)
        for role, role_signers in signers.items():
            for signer in role_signers:
                root.add_key(signer.public_key, role)
            root.roles[role].threshold = threshold
        metadata: dict[str, Metadata[Any]] = {
            Root.type: Metadata(root),
            Targets.type: Metadata(Targets(expires=now + DEFAULT_EXPIRY[Targets.type])),
            Snapshot.type: Metadata(Snapshot(expires=now + DEFAULT_EXPIRY[Snapshot.type])),
            Timestamp.type: Metadata(Timestamp(expires=now + DEFAULT_EXPIRY[Timestamp.type])),
        }
        writer = cls(root_dir, signers, metadata)
        writer.targets_dir.mkdir(parents=True, exist_ok=True)
        writer._write_role(Root.type)
        writer._write_role(Targets.type)
        writer._write_role(Snapshot.type)
        writer._write_role(Timestamp.type)
        return writer

    @classmethod
    def open(cls, root_dir: Path, keys_dir: Path) -> RepositoryWriter:
        metadata_dir = root_dir / "metadata"
        root = Metadata[Root].from_file(str(_latest(metadata_dir, "root")))
        timestamp = Metadata[Timestamp].from_file(str(metadata_dir / "timestamp.json"))
        snapshot_version = timestamp.signed.snapshot_meta.version
        snapshot = Metadata[Snapshot].from_file(
            str(metadata_dir / f"{snapshot_version}.snapshot.json")
        )
        targets_version = snapshot.signed.meta["targets.json"].version
        targets = Metadata[Targets].from_file(str(metadata_dir / f"{targets_version}.targets.json"))
        held = load_role_keys(keys_dir)
        return cls(
            root_dir,
            listed_signers(root.signed, held),
            {
                Root.type: root,
                Targets.type: targets,
                Snapshot.type: snapshot,
                Timestamp.type: timestamp,
            },
            held=held,
        )

    def root_bytes(self) -> bytes:
        return self.md[Root.type].to_bytes(_SERIALIZER)

    # --- targets -------------------------------------------------------------------------------

    def add_target(
        self,
        target_path: str,
        source: Path,
        custom: dict[str, Any] | None = None,
        *,
        link: bool = True,
    ) -> TargetFile:
        """Place ``source`` under its consistent-snapshot name and list it in targets."""
        info = TargetFile.from_file(target_path, str(source), ["sha256"])
        if custom is not None:
            info.unrecognized_fields["custom"] = custom
        self.place_file(
            f"{Path(target_path).parent}/{info.hashes['sha256']}.{Path(target_path).name}",
            source,
            link=link,
        )
        self.md[Targets.type].signed.targets[target_path] = info
        return info

    def remove_target(self, target_path: str) -> None:
        self.md[Targets.type].signed.targets.pop(target_path, None)

    def place_file(self, relative: str, source: Path, *, link: bool = True) -> Path:
        """Put a file under targets/: a hard link where possible (no second copy on disk)."""
        dest = self.targets_dir / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            return dest
        if link:
            try:
                os.link(source, dest)
                return dest
            except OSError:
                pass  # another file system: copy instead
        write_atomic(dest, source.read_bytes())
        return dest

    def targets(self) -> dict[str, TargetFile]:
        return dict(self.md[Targets.type].signed.targets)

    # --- signing and publishing ----------------------------------------------------------------

    def publish(self, roles: Iterable[str] = (Targets.type,)) -> None:
        """Bump and re-sign the given roles, then snapshot and timestamp, in safe order."""
        for role in roles:
            if role in (Snapshot.type, Timestamp.type):
                continue
            self._bump(role)
            self._write_role(role)
        self._publish_snapshot_and_timestamp()

    def _publish_snapshot_and_timestamp(
        self, before_timestamp: Callable[[], None] | None = None
    ) -> None:
        snapshot = self.md[Snapshot.type].signed
        snapshot.meta["targets.json"] = MetaFile(version=self.md[Targets.type].signed.version)
        self._bump(Snapshot.type)
        self._write_role(Snapshot.type)
        if before_timestamp is not None:
            before_timestamp()
        self._bump(Timestamp.type)
        self.md[Timestamp.type].signed.snapshot_meta = MetaFile(version=snapshot.version)
        self._write_role(Timestamp.type)

    def accept_targets(self, targets: Metadata[Targets]) -> None:
        """Publish targets metadata signed elsewhere (by the operator's offline targets key),
        as it is, then re-sign snapshot and timestamp with the online keys.

        The caller has verified ``targets`` against root (keys, threshold, version): the
        control plane never holds the targets key, so it can only pass on what was signed.
        """
        self.md[Targets.type] = targets
        self.write_signed(Targets.type)
        self.publish(roles=())

    def accept_root(self, root: Metadata[Root], targets: Metadata[Targets] | None = None) -> None:
        """Publish root metadata signed elsewhere (by the offline root keys, old and new), as
        it is, with ``targets`` re-signed elsewhere if the targets key rotated; then re-sign
        snapshot and timestamp with the online keys the new root lists.

        The caller has verified ``root`` against the current root (version + 1, both
        thresholds) and holds those online keys (see ``edgelm_control.repository.rotation``).
        Files are written so that nothing refers to a new one before it is there: targets,
        snapshot, root, and the timestamp (the commit point) last. A client that walks to the
        new root in the moment before the timestamp is written may find the old targets
        unverifiable for that one refresh; the next one is consistent.
        """
        self.md[Root.type] = root
        self.signers = listed_signers(root.signed, self.held)
        if targets is not None:
            self.md[Targets.type] = targets
            self.write_signed(Targets.type)
        self._publish_snapshot_and_timestamp(before_timestamp=lambda: self.write_signed(Root.type))

    def refresh_timestamp(self) -> None:
        """Re-sign the timestamp (a new version, a new expiry) over the same snapshot."""
        self._bump(Timestamp.type)
        self._write_role(Timestamp.type)

    def _bump(self, role: str) -> None:
        signed = self.md[role].signed
        signed.version += 1
        signed.expires = _now() + self.expiry[role]

    def sign(self, role: str, signers: Iterable[Signer] | None = None) -> None:
        md = self.md[role]
        md.signatures.clear()
        for signer in self.signers[role] if signers is None else signers:
            md.sign(signer, append=True)

    def _write_role(self, role: str, *, sign: bool = True) -> None:
        if sign:
            self.sign(role)
        self.write_signed(role)

    def write_signed(self, role: str) -> None:
        """Write the role as it is now (tests use this after tampering with signatures)."""
        md = self.md[role]
        data = md.to_bytes(_SERIALIZER)
        version = md.signed.version
        if role == Timestamp.type:
            write_atomic(self.metadata_dir / "timestamp.json", data)
        else:
            write_atomic(self.metadata_dir / f"{version}.{role}.json", data)


def load_role_keys(keys_dir: Path) -> dict[str, list[Signer]]:
    """Every TUF key in ``keys_dir``, by role: the files named ``<role>-N.pem``.

    A fleet's ``control/keys`` also holds ``director.pem`` and ``director-N.pem``, which are
    not TUF keys; and after a rotation it may hold keys root no longer lists (kept until the
    operator removes them): :func:`listed_signers` leaves those out.
    """
    signers: dict[str, list[Signer]] = {role: [] for role in ROLES}
    for pem in sorted(keys_dir.glob("*.pem")):
        role, sep, index = pem.stem.rpartition("-")
        if sep and role in signers and index.isdigit():
            signers[role].append(load_key(pem))
    return signers


def listed_signers(root: Root, held: dict[str, list[Signer]]) -> dict[str, list[Signer]]:
    """Of the ``held`` keys, those ``root`` lists for each role: a signature by a key root
    does not list would only be dead weight in every client's download."""
    return {
        role: [s for s in held.get(role, []) if s.public_key.keyid in root.roles[role].keyids]
        for role in ROLES
    }


def _latest(metadata_dir: Path, role: str) -> Path:
    versions = [int(p.name.split(".", 1)[0]) for p in metadata_dir.glob(f"*.{role}.json")]
    if not versions:
        raise FileNotFoundError(f"no {role} metadata in {metadata_dir}")
    return metadata_dir / f"{max(versions)}.{role}.json"
