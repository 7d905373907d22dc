"""Rotating a fleet's keys: the next root, signed by the old root keys and the new. Pure.

A key rotation is a new root version. For each role this module can rotate:

=========  ====================================  =============================================
role       what root version N + 1 changes        what else must follow
=========  ====================================  =============================================
root       the root role's keys                   nothing: devices walk N -> N + 1 themselves
targets    the targets role's keys                the published targets, re-signed with the new
                                                  key (version + 1), pushed with the root
director   ``x-edgelm-director-keys``             the new private key copied to the control
           (:mod:`edgelm_protocol.root_director`)  plane's keys_dir before the root is pushed
=========  ====================================  =============================================

The role's keys are replaced, not added to: a rotated-out key is out at once (root N + 1 no
longer lists it, so nothing it signs verifies under N + 1). The role keeps its threshold and
gets that many new keys. Root N + 1 is signed by a threshold of root N's keys (so a device
that trusts N accepts it) and by a threshold of its own (so it stands on its own as the next
anchor): :func:`check_rotation` makes exactly the checks the control plane and python-tuf's
ngclient on every device make, before anything leaves this machine.

Nothing here reads a file or the clock: roots, signers and the time come in, signed metadata
or an :class:`~edgelm_provisioning.errors.InvalidValue` goes out.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Iterable, Sequence
from typing import Any

from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets

from edgelm_protocol.errors import InvalidKey
from edgelm_protocol.root_director import director_keys_of, set_director_keys
from edgelm_provisioning.errors import InvalidValue
from edgelm_provisioning.targets_signing import TARGETS_EXPIRY

ROTATABLE_ROLES = (Root.type, Targets.type, "director")
#: How long a new root's signature holds (fleet-init's root gets the same).
ROOT_EXPIRY = datetime.timedelta(days=365)


def new_key_count(current: Root, role: str) -> int:
    """How many new keys a rotation of ``role`` makes: the role's threshold (one for the
    director, whose states carry one signature)."""
    if role == "director":
        return 1
    return int(current.roles[role].threshold)


def next_root(
    current: Root,
    role: str,
    *,
    now: datetime.datetime,
    tuf_keys: Sequence[Key] = (),
    director_pems: Sequence[str] = (),
) -> Root:
    """Root version N + 1: ``current`` with ``role``'s keys replaced and a new expiry.

    ``tuf_keys`` are the new public keys of a ``root`` or ``targets`` rotation;
    ``director_pems`` the new director public keys (PEM) of a ``director`` rotation.
    """
    if role not in ROTATABLE_ROLES:
        raise InvalidValue(
            "role", f"role must be one of {', '.join(ROTATABLE_ROLES)}, got {role!r}"
        )
    new = Root.from_dict(copy.deepcopy(current.to_dict()))
    new.version = current.version + 1
    new.expires = (now + ROOT_EXPIRY).replace(microsecond=0)
    if role == "director":
        if not director_pems:
            raise InvalidValue("director", "a director rotation needs the new director key")
        try:
            set_director_keys(new, director_pems)
        except InvalidKey as exc:
            raise InvalidValue("director", str(exc)) from exc
        return new
    threshold = new.roles[role].threshold
    if len({key.keyid for key in tuf_keys}) < threshold:
        raise InvalidValue(
            "role",
            f"the {role} role needs {threshold} new key(s) (its threshold), got {len(tuf_keys)}",
        )
    for keyid in list(new.roles[role].keyids):
        new.revoke_key(keyid, role)
    for key in tuf_keys:
        new.add_key(key, role)
    return new


def sign_root(root: Root, signers: Iterable[Signer]) -> Metadata[Root]:
    """``root`` signed by each of ``signers`` (the old root keys and, for a root rotation,
    the new ones)."""
    metadata = Metadata(root)
    for signer in signers:
        metadata.sign(signer, append=True)
    return metadata


def check_rotation(previous: Root, new: Metadata[Root]) -> None:
    """The checks a device's ngclient and the control plane make on root N + 1."""
    if new.signed.version != previous.version + 1:
        raise InvalidValue(
            "root",
            f"root version must be {previous.version + 1} (the current one + 1), "
            f"got {new.signed.version}",
        )
    for who, delegator in (
        (f"root v{previous.version}'s keys", previous),
        ("its own root keys", new.signed),
    ):
        try:
            delegator.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        except UnsignedMetadataError as exc:
            raise InvalidValue(
                "root",
                f"root v{new.signed.version} is not signed by a threshold of {who}: {exc}",
                hint="DIR/keys must hold the current root keys (keys/root-N.pem)",
            ) from exc
    try:
        director_keys_of(new.signed)
    except InvalidKey as exc:
        raise InvalidValue("root", str(exc)) from exc


def listed(root: Root, role: str, held: Iterable[Signer]) -> list[Signer]:
    """The ``held`` signers ``root`` lists for ``role``."""
    keyids = set(root.roles[role].keyids)
    return [signer for signer in held if signer.public_key.keyid in keyids]


def require_threshold(root: Root, role: str, signers: Sequence[Signer], where: str) -> None:
    """Refuse to go on without enough of ``role``'s keys to sign for it."""
    threshold = root.roles[role].threshold
    if len(signers) < threshold:
        raise InvalidValue(
            "role",
            f"root v{root.version} needs {threshold} {role} key(s) to sign, and {where} holds "
            f"{len(signers)} of those it lists",
            hint=f"the {role} keys are the keys/{role}-N.pem files rotate-keys and fleet-init "
            "made; restore them from your backup of the fleet directory",
        )


def targets_verify(root: Root, targets: Metadata[Targets]) -> bool:
    return root.get_verification_result(
        Targets.type, targets.signed_bytes, targets.signatures
    ).verified


def resign_targets(
    current: Metadata[Targets], signers: Sequence[Signer], *, now: datetime.datetime
) -> Metadata[Targets]:
    """The same targets, version + 1, a new expiry, signed by ``signers`` (the new targets
    keys): what a targets-key rotation pushes with its root."""
    following = Metadata[Targets].from_dict(copy.deepcopy(current.to_dict()))
    following.signed.version = current.signed.version + 1
    following.signed.expires = (now + TARGETS_EXPIRY).replace(microsecond=0)
    following.signatures.clear()
    for signer in signers:
        following.sign(signer, append=True)
    return following


def rotation_summary(previous: Root, new: Root) -> dict[str, Any]:
    """What changed between two roots, for the command's output."""

    def keys(root: Root, role: str) -> list[str]:
        return sorted(root.roles[role].keyids)

    changed = {
        role: {"from": keys(previous, role), "to": keys(new, role)}
        for role in sorted(new.roles)
        if keys(previous, role) != keys(new, role)
    }
    before, after = director_keys_of(previous), director_keys_of(new)
    return {
        "root_version": new.version,
        "expires": new.expires.isoformat(),
        "roles_changed": changed,
        "director_keys_changed": before != after,
    }
