"""Checking a pushed root (a key rotation): signed root metadata in, a publish plan out. Pure.

The operator rotates a key offline (``edgelm provision rotate-keys``) and pushes root
version N + 1, signed by a threshold of root N's keys and by a threshold of its own, with
the published targets re-signed when the targets key changed (``edgelm fleet keys
publish``). The control plane accepts it only if all of these hold, in this order:

1. it parses as TUF root metadata                                  :class:`MalformedRoot`
2. its version is the current one + 1                              :class:`WrongRootVersion`
3. root N's keys signed it up to root N's threshold, and its own
   keys up to its own threshold (python-tuf's ``verify_delegate``,
   the check every device's ngclient makes when it walks the roots) :class:`ForgedRoot`
4. it has not expired                                              :class:`ExpiredRoot`
5. consistent snapshots stay on, and its director-keys field (if
   any) is usable                                                  :class:`InvalidRoot`
6. this server holds enough of the snapshot and timestamp keys it
   lists to meet their thresholds, and the private key of one of
   the director keys it lists (else the repository and the desired
   states would stop verifying the moment it is published)         :class:`MissingOnlineKey`
7. the published targets verify under it; if not, re-signed targets
   came with it: version + 1, the same targets exactly, signed by
   its targets keys (the model push's checks, against the new root) :class:`TargetsNotResigned`,
                                                                   :class:`InvalidTarget`, ...

Nothing here reads a file or the clock. A forged, replayed or out-of-order root changes
nothing: the caller publishes only the plan this returns.
"""

from __future__ import annotations

import datetime
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from securesystemslib.exceptions import FormatError
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from edgelm_control.repository.errors import (
    ExpiredRoot,
    ForgedRoot,
    InvalidRoot,
    InvalidTarget,
    MalformedRoot,
    MissingOnlineKey,
    TargetsNotResigned,
    WrongRootVersion,
)
from edgelm_control.repository.push import PushPlan, plan_push
from edgelm_protocol import DirectorKeys
from edgelm_protocol.errors import InvalidKey
from edgelm_protocol.root_director import director_keys_of

ONLINE_ROLES = (Snapshot.type, Timestamp.type)


@dataclass(frozen=True)
class HeldKeys:
    """What this control plane can sign with: TUF keyids per online role, and the keyids
    (:func:`edgelm_protocol.key_id`) of the director keys in its keys directory."""

    online: Mapping[str, Collection[str]]
    director: Collection[str]


@dataclass(frozen=True)
class RootPlan:
    root: Metadata[Root]
    #: Re-signed targets to publish with the root (None: the published ones still verify).
    targets: PushPlan | None
    #: The director keys (PEM) the new root lists; None if it says nothing about them.
    director_keys: tuple[str, ...] | None

    @property
    def version(self) -> int:
        return int(self.root.signed.version)


def plan_root(
    current: Metadata[Root],
    current_targets: Metadata[Targets],
    raw_root: bytes,
    raw_targets: bytes | None,
    *,
    held: HeldKeys,
    now: datetime.datetime,
) -> RootPlan:
    """Checks 1 to 7 (see the module docstring) on the pushed root ``raw_root``."""
    new = _parse(raw_root)
    signed: Root = new.signed
    expected = current.signed.version + 1
    if signed.version != expected:
        raise WrongRootVersion(expected=expected, actual=signed.version)
    for by, delegator in (
        (f"a threshold of root v{current.signed.version}'s keys", current),
        ("a threshold of its own root keys", new),
    ):
        try:
            delegator.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        except (UnsignedMetadataError, FormatError, ValueError) as exc:
            raise ForgedRoot(by=by, reason=str(exc)) from exc
    if signed.is_expired(now):
        raise ExpiredRoot(signed.expires.isoformat())
    if not signed.consistent_snapshot:
        raise InvalidRoot("the new root must keep consistent_snapshot true (the layout needs it)")
    try:
        director = director_keys_of(signed)
    except InvalidKey as exc:
        raise InvalidRoot(str(exc)) from exc
    _check_held(signed, director, held)
    return RootPlan(new, _targets_plan(new, current_targets, raw_targets, now), director)


def _parse(raw: bytes) -> Metadata[Root]:
    try:
        metadata: Metadata[Any] = Metadata.from_bytes(raw)
    except (DeserializationError, ValueError, TypeError, KeyError) as exc:
        raise MalformedRoot(f"root must be TUF root metadata (JSON): {exc}") from exc
    if not isinstance(metadata.signed, Root):
        raise MalformedRoot(f"root must be root metadata, got {metadata.signed.type}")
    return metadata


def _check_held(root: Root, director: tuple[str, ...] | None, held: HeldKeys) -> None:
    for role in ONLINE_ROLES:
        listed = root.roles[role]
        have = len(set(listed.keyids) & set(held.online.get(role, ())))
        if have < listed.threshold:
            raise MissingOnlineKey(
                role=role,
                needed=listed.threshold,
                held=have,
                hint=f"copy the new {role} key into the control plane's keys_dir first",
            )
    if director is not None:
        listed_ids = DirectorKeys.from_pem([pem.encode() for pem in director]).keyids
        if not listed_ids & set(held.director):
            raise MissingOnlineKey(
                role="director",
                needed=1,
                held=0,
                hint="copy the new director key (DIR/control/keys/director-N.pem) into the "
                "control plane's keys_dir first",
            )


def _targets_plan(
    root: Metadata[Root],
    current: Metadata[Targets],
    raw_targets: bytes | None,
    now: datetime.datetime,
) -> PushPlan | None:
    still_valid = root.signed.get_verification_result(
        Targets.type, current.signed_bytes, current.signatures
    ).verified
    if raw_targets is None:
        if not still_valid:
            raise TargetsNotResigned(targets_version=current.signed.version)
        return None
    plan = plan_push(root, current, raw_targets, now=now)
    published = {path: info.to_dict() for path, info in current.signed.targets.items()}
    resigned = {path: info.to_dict() for path, info in plan.metadata.signed.targets.items()}
    if resigned != published:
        changed = sorted(set(published) ^ set(resigned)) or sorted(published)
        raise InvalidTarget(
            "targets pushed with a root must list the published targets exactly (a key "
            "rotation only re-signs them); push new models with edgelm fleet models push",
            path=changed[0] if changed else "targets",
        )
    return plan
