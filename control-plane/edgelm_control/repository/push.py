"""Checking a pushed model: signed targets metadata and blobs in, a publish plan out. Pure.

The operator signs a new targets metadata with the offline targets key and uploads it with
the blobs it adds. The control plane accepts it only if all of these hold, in this order:

1. it parses as TUF targets metadata                               :class:`MalformedTargets`
2. enough of root's targets keys signed it (root's threshold)     :class:`ForgedTargets`
3. its version is the current one + 1                             :class:`WrongTargetsVersion`
4. it has not expired                                             :class:`ExpiredTargets`
5. every target follows the edgelm schema (``custom["edgelm"]``),
   one target per ``name@version``, no delegations                :class:`InvalidTarget`
6. no published target changes under its path                     :class:`ImmutableTarget`
7. every blob a new target needs came, with the length and sha256
   the target (or its bundle manifest) gives, and nothing else     :class:`MissingBlob`,
                                                                   :class:`BlobMismatch`,
                                                                   :class:`UnexpectedBlob`

Nothing here reads a file or the clock: the caller passes the trusted root, the current
targets, the time, the bytes of bundle manifests and the hashes of what it received. A
control plane that is owned can therefore publish only what the operator's key signed.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from securesystemslib.exceptions import FormatError
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets
from tuf.api.serialization import DeserializationError

from edgelm_control.repository.errors import (
    BlobMismatch,
    ExpiredTargets,
    ForgedTargets,
    ImmutableTarget,
    InvalidTarget,
    MalformedTargets,
    MissingBlob,
    UnexpectedBlob,
    WrongTargetsVersion,
)
from edgelm_protocol import ProtocolError
from edgelm_protocol.bundle import parse_manifest
from edgelm_protocol.targets import ModelTarget, parse_model_target

SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Blob:
    """A file a new target needs, and where it goes under ``targets/``."""

    sha256: str
    length: int
    placement: str  # consistent-snapshot name: models/N/V/<sha256>.<file> or .../files/<sha>
    target_path: str


@dataclass(frozen=True)
class ReceivedBlob:
    """An uploaded part: its name, and the sha256 and length of what actually came."""

    part: str
    sha256: str
    length: int


@dataclass(frozen=True)
class PushPlan:
    metadata: Metadata[Targets]
    models: tuple[ModelTarget, ...]  # every target of the new metadata
    added: tuple[ModelTarget, ...]  # the targets not published before
    blobs: tuple[Blob, ...]  # the blobs of the added targets (bundle members not yet)


def target_blob(model: ModelTarget) -> Blob:
    directory, _, filename = model.path.rpartition("/")
    return Blob(model.sha256, model.length, f"{directory}/{model.sha256}.{filename}", model.path)


def member_blobs(model: ModelTarget, manifest: bytes) -> list[Blob]:
    """The members a verified bundle manifest pins, each stored by its hash."""
    directory = model.path.rpartition("/")[0]
    try:
        members = parse_manifest(manifest)
    except ProtocolError as exc:
        raise InvalidTarget(f"target {model.path}: {exc}", path=model.path) from exc
    return [Blob(m.sha256, m.length, f"{directory}/files/{m.sha256}", model.path) for m in members]


def plan_push(
    root: Metadata[Root],
    current: Metadata[Targets],
    raw: bytes,
    *,
    now: datetime.datetime,
) -> PushPlan:
    """Checks 1 to 6 on the pushed targets metadata ``raw``; the blobs it needs."""
    try:
        metadata: Metadata[Any] = Metadata.from_bytes(raw)
    except (DeserializationError, ValueError, TypeError, KeyError) as exc:
        raise MalformedTargets(
            f"targets must be TUF targets metadata (JSON): {exc}", param="targets"
        ) from exc
    if not isinstance(metadata.signed, Targets):
        raise MalformedTargets(
            f"targets must be targets metadata, got {metadata.signed.type}", param="targets"
        )
    try:
        root.verify_delegate(Targets.type, metadata)
    except (UnsignedMetadataError, FormatError, ValueError) as exc:
        raise ForgedTargets(str(exc)) from exc
    signed: Targets = metadata.signed
    expected = current.signed.version + 1
    if signed.version != expected:
        raise WrongTargetsVersion(expected=expected, actual=signed.version)
    if signed.is_expired(now):
        raise ExpiredTargets(signed.expires.isoformat())
    if signed.delegations is not None:
        raise InvalidTarget("delegated targets roles are not supported", path="delegations")
    models: list[ModelTarget] = []
    added: list[ModelTarget] = []
    seen: dict[str, str] = {}
    for path, info in sorted(signed.targets.items()):
        custom = info.unrecognized_fields.get("custom")
        try:
            model = parse_model_target(
                path, info.length, dict(info.hashes), custom if isinstance(custom, dict) else None
            )
        except ProtocolError as exc:
            raise InvalidTarget(f"target {path}: {exc}", path=path) from exc
        if model.ref in seen:
            raise InvalidTarget(
                f"targets {seen[model.ref]} and {path} are both {model.ref}; a model version "
                "has one target",
                path=path,
            )
        seen[model.ref] = path
        models.append(model)
        published = current.signed.targets.get(path)
        if published is None:
            added.append(model)
        elif published.to_dict() != info.to_dict():
            raise ImmutableTarget(path=path)
    return PushPlan(metadata, tuple(models), tuple(added), tuple(target_blob(m) for m in added))


def match_blobs(
    required: Sequence[Blob],
    received: Mapping[str, ReceivedBlob],
    *,
    present: Collection[str] = (),
) -> list[tuple[Blob, ReceivedBlob | None]]:
    """Check 7: pair each required blob with what came (None: it is stored already).

    ``received`` maps a sha256 to the part that carried it; ``present`` lists placements
    stored before (a push retried after a failure need not upload them again).
    """
    for blob in received.values():
        if SHA256_RE.fullmatch(blob.part) and blob.part != blob.sha256:
            raise BlobMismatch(
                part=blob.part, expected=f"sha256 {blob.part}", actual=f"sha256 {blob.sha256}"
            )
    pairs: list[tuple[Blob, ReceivedBlob | None]] = []
    used: set[str] = set()
    for need in required:
        got = received.get(need.sha256)
        if got is None:
            if need.placement in present:
                pairs.append((need, None))
                continue
            raise MissingBlob(path=need.target_path, sha256=need.sha256)
        if got.length != need.length:
            raise BlobMismatch(
                part=got.part, expected=f"{need.length} bytes", actual=f"{got.length} bytes"
            )
        used.add(need.sha256)
        pairs.append((need, got))
    for sha256 in sorted(set(received) - used):
        raise UnexpectedBlob(sha256=sha256)
    return pairs
