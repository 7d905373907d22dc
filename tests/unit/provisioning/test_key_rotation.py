"""The key-rotation core, without I/O: real TUF metadata and real keys, in memory.

The same roots go through the provisioning side (``key_rotation``: make and check root N + 1)
and the control plane's (``repository.rotation.plan_root``: accept or refuse it), so the two
agree on what a rotation is; python-tuf's ngclient makes the third, identical check on devices
(tests/integration/test_key_rotation_e2e.py).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp

from edgelm_control.repository.errors import (
    ExpiredRoot,
    ForgedRoot,
    ForgedTargets,
    InvalidRoot,
    InvalidTarget,
    MalformedRoot,
    MissingOnlineKey,
    RootRefused,
    TargetsNotResigned,
    WrongRootVersion,
    WrongTargetsVersion,
)
from edgelm_control.repository.rotation import HeldKeys, plan_root
from edgelm_protocol import DirectorKeys
from edgelm_protocol.errors import InvalidKey
from edgelm_protocol.root_director import (
    DIRECTOR_KEYS_FIELD,
    MAX_DIRECTOR_KEYS,
    director_keyring_of,
    director_keys_of,
    set_director_keys,
)
from edgelm_provisioning.errors import InvalidValue
from edgelm_provisioning.key_rotation import (
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

NOW = datetime.datetime(2026, 11, 28, tzinfo=datetime.UTC)


def signer() -> CryptoSigner:
    return CryptoSigner(Ed25519PrivateKey.generate())


def pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class Fleet:
    """A fleet's keys and its first root and targets, as fleet-init makes them."""

    def __init__(self, root_threshold: int = 1) -> None:
        self.root_keys = [signer() for _ in range(root_threshold)]
        self.targets_key = signer()
        self.snapshot_key = signer()
        self.timestamp_key = signer()
        self.director = Ed25519PrivateKey.generate()
        signed = Root(expires=NOW + datetime.timedelta(days=365), consistent_snapshot=True)
        for key in self.root_keys:
            signed.add_key(key.public_key, Root.type)
        signed.roles[Root.type].threshold = root_threshold
        signed.add_key(self.targets_key.public_key, Targets.type)
        signed.add_key(self.snapshot_key.public_key, Snapshot.type)
        signed.add_key(self.timestamp_key.public_key, Timestamp.type)
        self.root = sign_root(signed, self.root_keys)
        targets = Targets(version=3, expires=NOW + datetime.timedelta(days=30))
        data = b"GGUF model bytes"
        targets.targets["models/tiny/1.0/model.gguf"] = TargetFile(
            length=len(data),
            hashes={"sha256": "ab" * 32},
            path="models/tiny/1.0/model.gguf",
            unrecognized_fields={"custom": custom("tiny", "1.0")},
        )
        self.targets = Metadata(targets)
        self.targets.sign(self.targets_key)

    def held(self, director: Sequence[Ed25519PrivateKey] = ()) -> HeldKeys:
        return HeldKeys(
            online={
                Snapshot.type: [self.snapshot_key.public_key.keyid],
                Timestamp.type: [self.timestamp_key.public_key.keyid],
            },
            director=DirectorKeys([k.public_key() for k in (self.director, *director)]).keyids,
        )

    def rotate(self, role: str, *, new: Sequence[Signer] = (), director: str | None = None) -> Root:
        return next_root(
            self.root.signed,
            role,
            now=NOW,
            tuf_keys=[s.public_key for s in new],
            director_pems=[director] if director else [],
        )


def custom(name: str, version: str) -> dict[str, Any]:
    return {
        "edgelm": {
            "name": name,
            "version": version,
            "format": "gguf",
            "backend": "llama.cpp",
            "context_length": 2048,
            "chat_template": None,
            "quantization": "Q4_1",
            "min_ram_bytes": 0,
        }
    }


def raw(metadata: Metadata[Any]) -> bytes:
    return metadata.to_bytes()


class TestNextRoot:
    def test_a_root_rotation_replaces_the_root_keys_and_bumps_the_version(self):
        """Root N + 1 lists only the new root key, keeps every other role, expires later."""
        fleet, new_key = Fleet(), signer()
        new = fleet.rotate(Root.type, new=[new_key])
        assert new.version == fleet.root.signed.version + 1
        assert new.roles[Root.type].keyids == [new_key.public_key.keyid]
        assert new.roles[Targets.type].keyids == fleet.root.signed.roles[Targets.type].keyids
        assert new.expires > fleet.root.signed.expires - datetime.timedelta(days=1)
        assert fleet.root.signed.version == 1  # the current root is left as it was

    def test_a_rotation_needs_as_many_new_keys_as_the_threshold(self):
        """A role with threshold 2 cannot be handed one key: nothing could ever sign for it."""
        fleet = Fleet(root_threshold=2)
        assert new_key_count(fleet.root.signed, Root.type) == 2
        with pytest.raises(InvalidValue, match="needs 2 new key"):
            fleet.rotate(Root.type, new=[signer()])

    def test_a_director_rotation_writes_the_signed_field(self):
        """The director's keys live in root's signed part, so the root keys vouch for them."""
        fleet, key = Fleet(), Ed25519PrivateKey.generate()
        new = fleet.rotate("director", director=pem(key))
        assert director_keys_of(new) == (pem(key),)
        assert DIRECTOR_KEYS_FIELD in new.to_dict()
        keyring = director_keyring_of(new)
        assert keyring is not None
        assert keyring.keyids == DirectorKeys([key.public_key()]).keyids
        assert director_keys_of(fleet.root.signed) is None  # a root that never named one

    def test_an_unknown_role_is_refused(self):
        """Snapshot and timestamp keys are not rotated by this command."""
        with pytest.raises(InvalidValue, match="role must be one of"):
            Fleet().rotate(Snapshot.type, new=[signer()])

    def test_summary_names_what_changed(self):
        """The command's output shows which role moved from which keyids to which."""
        fleet, new_key = Fleet(), signer()
        summary = rotation_summary(fleet.root.signed, fleet.rotate(Targets.type, new=[new_key]))
        assert list(summary["roles_changed"]) == [Targets.type]
        assert summary["roles_changed"][Targets.type]["to"] == [new_key.public_key.keyid]
        assert summary["director_keys_changed"] is False


class TestDirectorField:
    def test_a_bad_field_is_refused_with_what_was_expected(self):
        """Not a list, empty, too many or not PEM: each is an InvalidKey, and a refused value
        is never written into the root."""
        root = Fleet().root.signed
        for bad in ([], ["not a pem"], [pem(Ed25519PrivateKey.generate())] * 9):
            with pytest.raises(InvalidKey):
                set_director_keys(root, bad)
            assert DIRECTOR_KEYS_FIELD not in root.unrecognized_fields
        root.unrecognized_fields[DIRECTOR_KEYS_FIELD] = "a string"
        with pytest.raises(InvalidKey, match=f"list of 1 to {MAX_DIRECTOR_KEYS}"):
            director_keys_of(root)


class TestCheckRotation:
    def test_signed_by_the_old_and_the_new_root_keys_it_verifies(self):
        """The operator's own check passes for a properly made rotation."""
        fleet, new_key = Fleet(), signer()
        signed = sign_root(fleet.rotate(Root.type, new=[new_key]), [*fleet.root_keys, new_key])
        check_rotation(fleet.root.signed, signed)

    @pytest.mark.parametrize("who", ["old only", "new only"])
    def test_a_root_missing_either_threshold_is_refused(self, who: str):
        """Both thresholds are needed: the old one so devices accept it, the new one so it
        stands as the next anchor."""
        fleet, new_key = Fleet(), signer()
        signers = fleet.root_keys if who == "old only" else [new_key]
        signed = sign_root(fleet.rotate(Root.type, new=[new_key]), signers)
        with pytest.raises(InvalidValue, match="not signed by a threshold"):
            check_rotation(fleet.root.signed, signed)

    def test_a_skipped_version_is_refused(self):
        """Roots go one version at a time: N + 2 over N is not a rotation devices can walk."""
        fleet = Fleet()
        new = fleet.rotate(Targets.type, new=[signer()])
        new.version += 1
        with pytest.raises(InvalidValue, match="must be 2"):
            check_rotation(fleet.root.signed, sign_root(new, fleet.root_keys))

    def test_too_few_held_root_keys_are_refused_before_anything_is_signed(self):
        """With a threshold of 2 and one key at hand, the operator hears which keys are missing."""
        fleet = Fleet(root_threshold=2)
        held = listed(fleet.root.signed, Root.type, [*fleet.root_keys[:1], signer()])
        with pytest.raises(InvalidValue, match="needs 2 root key"):
            require_threshold(fleet.root.signed, Root.type, held, "DIR/keys")


class TestTargetsRotation:
    def test_a_rotated_out_targets_key_no_longer_signs_models_devices_accept(self):
        """Under root N + 1 the published targets (old key) do not verify, the re-signed ones
        (new key) do, and anything the old key signs later does not."""
        fleet, new_key = Fleet(), signer()
        new = sign_root(fleet.rotate(Targets.type, new=[new_key]), fleet.root_keys)
        assert targets_verify(fleet.root.signed, fleet.targets)
        assert not targets_verify(new.signed, fleet.targets)
        resigned = resign_targets(fleet.targets, [new_key], now=NOW)
        assert resigned.signed.version == fleet.targets.signed.version + 1
        assert resigned.signed.targets == fleet.targets.signed.targets
        assert targets_verify(new.signed, resigned)
        by_old = resign_targets(resigned, [fleet.targets_key], now=NOW)
        assert not targets_verify(new.signed, by_old)


class TestControlPlaneAcceptsRoot:
    """``plan_root``: the control plane's checks on a pushed root."""

    def test_a_proper_root_rotation_is_accepted(self):
        """Signed by both thresholds, version + 1: the plan publishes it with no targets."""
        fleet, new_key = Fleet(), signer()
        signed = sign_root(fleet.rotate(Root.type, new=[new_key]), [*fleet.root_keys, new_key])
        plan = plan_root(fleet.root, fleet.targets, raw(signed), None, held=fleet.held(), now=NOW)
        assert plan.version == 2
        assert plan.targets is None
        assert plan.director_keys is None

    @pytest.mark.parametrize("who", ["old only", "new only", "attacker"])
    def test_a_forged_root_is_refused(self, who: str):
        """A root not signed by a threshold of the current root keys and of its own is a 422
        naming which threshold failed."""
        fleet, new_key, attacker = Fleet(), signer(), signer()
        signers = {"old only": fleet.root_keys, "new only": [new_key], "attacker": [attacker]}
        new = fleet.rotate(Root.type, new=[attacker if who == "attacker" else new_key])
        signed = sign_root(new, signers[who])
        with pytest.raises(ForgedRoot) as caught:
            plan_root(fleet.root, fleet.targets, raw(signed), None, held=fleet.held(), now=NOW)
        assert caught.value.status_code == 422
        assert ("v1" in caught.value.by) == (who != "old only")

    def test_a_root_signed_with_old_keys_after_tampering_is_refused(self):
        """Signatures cover the whole signed part: a field changed after signing fails."""
        fleet, new_key = Fleet(), signer()
        signed = sign_root(fleet.rotate(Root.type, new=[new_key]), [*fleet.root_keys, new_key])
        signed.signed.roles[Targets.type].threshold = 1
        signed.signed.add_key(signer().public_key, Targets.type)
        with pytest.raises(ForgedRoot):
            plan_root(fleet.root, fleet.targets, raw(signed), None, held=fleet.held(), now=NOW)

    @pytest.mark.parametrize("version", [1, 3, 99])
    def test_a_root_out_of_order_is_refused(self, version: int):
        """The same version again, or one that skips, is a 409 with the expected version."""
        fleet = Fleet()
        new = fleet.rotate(Targets.type, new=[signer()])
        new.version = version
        signed = sign_root(new, fleet.root_keys)
        with pytest.raises(WrongRootVersion) as caught:
            plan_root(fleet.root, fleet.targets, raw(signed), None, held=fleet.held(), now=NOW)
        assert (caught.value.expected, caught.value.actual, caught.value.status_code) == (
            2,
            version,
            409,
        )

    def test_not_root_metadata_is_malformed(self):
        """Targets metadata or junk where a root belongs is a 400."""
        fleet = Fleet()
        for junk in (raw(fleet.targets), b"{", b"[]"):
            with pytest.raises(MalformedRoot):
                plan_root(fleet.root, fleet.targets, junk, None, held=fleet.held(), now=NOW)

    def test_an_expired_root_is_refused(self):
        """A root that expired before it was published would stop every device at once."""
        fleet = Fleet()
        new = fleet.rotate(Targets.type, new=[signer()])
        new.expires = NOW - datetime.timedelta(days=1)
        signed = sign_root(new, fleet.root_keys)
        with pytest.raises(ExpiredRoot):
            plan_root(fleet.root, fleet.targets, raw(signed), None, held=fleet.held(), now=NOW)

    def test_consistent_snapshots_stay_on(self):
        """The repository's layout needs them; a root turning them off is refused."""
        fleet = Fleet()
        new = fleet.rotate(Targets.type, new=[signer()])
        new.consistent_snapshot = False
        signed = sign_root(new, fleet.root_keys)
        with pytest.raises(InvalidRoot, match="consistent_snapshot"):
            plan_root(fleet.root, fleet.targets, raw(signed), None, held=fleet.held(), now=NOW)

    def test_a_root_listing_online_keys_the_server_lacks_is_refused(self):
        """A new timestamp key the control plane does not hold would freeze the repository."""
        fleet = Fleet()
        new = fleet.rotate(Root.type, new=fleet.root_keys)  # the same root key, v2
        new.revoke_key(fleet.timestamp_key.public_key.keyid, Timestamp.type)
        new.add_key(signer().public_key, Timestamp.type)
        signed = sign_root(new, fleet.root_keys)
        with pytest.raises(MissingOnlineKey) as caught:
            plan_root(fleet.root, fleet.targets, raw(signed), None, held=fleet.held(), now=NOW)
        assert (caught.value.role, caught.value.status_code) == (Timestamp.type, 409)

    def test_a_director_key_the_server_lacks_is_refused_and_one_it_holds_is_accepted(self):
        """The director must be able to sign with a key the new root names."""
        fleet, key = Fleet(), Ed25519PrivateKey.generate()
        signed = sign_root(fleet.rotate("director", director=pem(key)), fleet.root_keys)
        with pytest.raises(MissingOnlineKey, match="director"):
            plan_root(fleet.root, fleet.targets, raw(signed), None, held=fleet.held(), now=NOW)
        plan = plan_root(
            fleet.root, fleet.targets, raw(signed), None, held=fleet.held([key]), now=NOW
        )
        assert plan.director_keys == (pem(key),)

    def test_a_bad_director_field_is_refused(self):
        """Signed by the root keys or not, a field no device could use is a 400."""
        fleet = Fleet()
        new = fleet.rotate(Targets.type, new=[signer()])
        new.unrecognized_fields[DIRECTOR_KEYS_FIELD] = ["not a key"]
        signed = sign_root(new, fleet.root_keys)
        with pytest.raises(InvalidRoot):
            plan_root(fleet.root, fleet.targets, raw(signed), None, held=fleet.held(), now=NOW)

    def test_a_targets_rotation_needs_the_targets_re_signed(self):
        """Without them the published targets would stop verifying: a 409 that says what to
        push; with them (new key, version + 1, same targets) it is accepted."""
        fleet, new_key = Fleet(), signer()
        signed = sign_root(fleet.rotate(Targets.type, new=[new_key]), fleet.root_keys)
        with pytest.raises(TargetsNotResigned) as caught:
            plan_root(fleet.root, fleet.targets, raw(signed), None, held=fleet.held(), now=NOW)
        assert caught.value.targets_version == 3
        resigned = resign_targets(fleet.targets, [new_key], now=NOW)
        plan = plan_root(
            fleet.root, fleet.targets, raw(signed), raw(resigned), held=fleet.held(), now=NOW
        )
        assert plan.targets is not None
        assert plan.targets.metadata.signed.version == 4

    def test_targets_re_signed_with_the_rotated_out_key_are_refused(self):
        """The old targets key cannot sign the targets that go with the new root."""
        fleet, new_key = Fleet(), signer()
        signed = sign_root(fleet.rotate(Targets.type, new=[new_key]), fleet.root_keys)
        by_old = resign_targets(fleet.targets, [fleet.targets_key], now=NOW)
        with pytest.raises(ForgedTargets):
            plan_root(
                fleet.root, fleet.targets, raw(signed), raw(by_old), held=fleet.held(), now=NOW
            )

    def test_re_signed_targets_must_list_the_published_ones_exactly(self):
        """A rotation is not a way to publish (or drop) a model without its blobs."""
        fleet, new_key = Fleet(), signer()
        signed = sign_root(fleet.rotate(Targets.type, new=[new_key]), fleet.root_keys)
        changed = resign_targets(fleet.targets, [new_key], now=NOW)
        changed.signed.targets.clear()
        changed.signatures.clear()
        changed.sign(new_key)
        with pytest.raises(InvalidTarget):
            plan_root(
                fleet.root, fleet.targets, raw(signed), raw(changed), held=fleet.held(), now=NOW
            )
        stale = resign_targets(fleet.targets, [new_key], now=NOW)
        stale.signed.version = 3
        stale.signatures.clear()
        stale.sign(new_key)
        with pytest.raises(WrongTargetsVersion):
            plan_root(
                fleet.root, fleet.targets, raw(signed), raw(stale), held=fleet.held(), now=NOW
            )

    def test_every_refusal_is_a_root_or_push_refusal_with_a_4xx(self):
        """The HTTP layer maps them in one place: each carries its status and code."""
        for cls in (MalformedRoot, InvalidRoot, ForgedRoot, ExpiredRoot, WrongRootVersion,
                    MissingOnlineKey, TargetsNotResigned):  # fmt: skip
            assert issubclass(cls, RootRefused)
            assert 400 <= cls.status_code < 500
            assert cls.code
