"""Checking a pushed model, without I/O (``repository/push.py``): real TUF metadata, in memory."""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from edgelm_control.repository.errors import (
    BlobMismatch,
    ExpiredTargets,
    ForgedTargets,
    ImmutableTarget,
    InvalidTarget,
    MalformedTargets,
    MissingBlob,
    PushRefused,
    UnexpectedBlob,
    WrongTargetsVersion,
)
from edgelm_control.repository.push import (
    Blob,
    PushPlan,
    ReceivedBlob,
    match_blobs,
    member_blobs,
    plan_push,
)
from edgelm_protocol.bundle import BundleFile, build_manifest

NOW = datetime.datetime(2026, 11, 28, tzinfo=datetime.UTC)
TARGETS_KEY = CryptoSigner(Ed25519PrivateKey.generate())
SECOND_KEY = CryptoSigner(Ed25519PrivateKey.generate())
ATTACKER = CryptoSigner(Ed25519PrivateKey.generate())


def custom(name: str, version: str, fmt: str = "gguf") -> dict[str, Any]:
    backend = "llama.cpp" if fmt == "gguf" else "onnxruntime-genai"
    return {
        "edgelm": {
            "name": name,
            "version": version,
            "format": fmt,
            "backend": backend,
            "context_length": 2048,
            "chat_template": None,
            "quantization": "Q4_1",
            "min_ram_bytes": 0,
        }
    }


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def root(threshold: int = 1, keys: tuple[CryptoSigner, ...] = (TARGETS_KEY,)) -> Metadata[Root]:
    signed = Root(expires=NOW + datetime.timedelta(days=365), consistent_snapshot=True)
    for key in keys:
        signed.add_key(key.public_key, Targets.type)
    signed.roles[Targets.type].threshold = threshold
    return Metadata(signed)


def targets(
    files: dict[str, tuple[bytes, dict[str, Any]]],
    *,
    version: int = 2,
    signers: tuple[CryptoSigner, ...] = (TARGETS_KEY,),
    expires: datetime.datetime = NOW + datetime.timedelta(days=30),
) -> Metadata[Targets]:
    signed = Targets(version=version, expires=expires)
    for path, (data, extra) in files.items():
        signed.targets[path] = TargetFile(
            length=len(data),
            hashes={"sha256": sha(data)},
            path=path,
            unrecognized_fields={"custom": extra},
        )
    metadata = Metadata(signed)
    for signer in signers:
        metadata.sign(signer, append=True)
    return metadata


GGUF = b"gguf model bytes" * 10
PATH = "models/m/1/model.gguf"
EMPTY = targets({}, version=1)


def plan(
    raw: bytes, *, trusted: Metadata[Root] | None = None, current: Metadata[Targets] = EMPTY
) -> PushPlan:
    return plan_push(trusted or root(), current, raw, now=NOW)


class TestPlanPush:
    def test_a_signed_next_version_adds_its_target_and_needs_its_blob(self):
        """The new target is listed with the blob it needs, at its consistent name."""
        got = plan(targets({PATH: (GGUF, custom("m", "1"))}).to_bytes())
        assert [m.ref for m in got.added] == ["m@1"]
        (blob,) = got.blobs
        assert blob.placement == f"models/m/1/{sha(GGUF)}.model.gguf"
        assert (blob.sha256, blob.length) == (sha(GGUF), len(GGUF))

    def test_a_key_root_does_not_trust_is_refused(self):
        """Signed by another key: ForgedTargets, before anything inside is looked at."""
        with pytest.raises(ForgedTargets):
            plan(targets({PATH: (GGUF, custom("m", "1"))}, signers=(ATTACKER,)).to_bytes())

    def test_too_few_signatures_for_roots_threshold_are_refused(self):
        """With a threshold of 2, one valid signature is not enough."""
        trusted = root(threshold=2, keys=(TARGETS_KEY, SECOND_KEY))
        one = targets({PATH: (GGUF, custom("m", "1"))}).to_bytes()
        with pytest.raises(ForgedTargets):
            plan(one, trusted=trusted)
        both = targets({PATH: (GGUF, custom("m", "1"))}, signers=(TARGETS_KEY, SECOND_KEY))
        assert plan(both.to_bytes(), trusted=trusted).added

    @pytest.mark.parametrize("version", [1, 3, 10])
    def test_a_version_other_than_current_plus_one_is_refused(self, version: int):
        """A replayed or skipped version is a WrongTargetsVersion with both numbers."""
        with pytest.raises(WrongTargetsVersion) as caught:
            plan(targets({PATH: (GGUF, custom("m", "1"))}, version=version).to_bytes())
        assert (caught.value.expected, caught.value.actual) == (2, version)

    def test_expired_metadata_is_refused(self):
        """Metadata past its expiry is refused even when correctly signed."""
        old = targets({}, expires=NOW - datetime.timedelta(seconds=1))
        with pytest.raises(ExpiredTargets):
            plan(old.to_bytes())

    @pytest.mark.parametrize(
        "files",
        [
            {PATH: (GGUF, {"edgelm": {"name": "m"}})},
            {PATH: (GGUF, custom("other", "1"))},
            {"models/m/1/model.gguf": (GGUF, custom("m", "1")),
             "models/m/1/bundle.json": (b"{}", custom("m", "1", "onnx"))},
            {"elsewhere/m.gguf": (GGUF, custom("m", "1"))},
        ],
        ids=["incomplete", "name-disagrees", "two-targets-one-version", "bad-path"],
    )  # fmt: skip
    def test_a_target_outside_the_schema_is_refused(self, files: dict[str, Any]):
        """The edgelm target schema applies to every target of the metadata."""
        with pytest.raises(InvalidTarget):
            plan(targets(files).to_bytes())

    def test_a_published_target_never_changes(self):
        """Other bytes under a published path are refused; the same target again is fine."""
        current = targets({PATH: (GGUF, custom("m", "1"))}, version=1)
        with pytest.raises(ImmutableTarget):
            plan(targets({PATH: (b"other", custom("m", "1"))}).to_bytes(), current=current)
        kept = plan(targets({PATH: (GGUF, custom("m", "1"))}).to_bytes(), current=current)
        assert kept.added == ()
        assert [m.ref for m in kept.models] == ["m@1"]

    @pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b'{"signed": {}}'])
    def test_bytes_that_are_not_metadata_are_malformed(self, raw: bytes):
        """Anything that does not parse as TUF metadata is a MalformedTargets (400)."""
        with pytest.raises(MalformedTargets):
            plan(raw)

    def test_root_metadata_in_place_of_targets_is_malformed(self):
        """Metadata of another role is refused as not being targets."""
        other = root()
        other.sign(TARGETS_KEY)
        with pytest.raises(MalformedTargets):
            plan(other.to_bytes())


@settings(max_examples=50)
@given(st.data())
def test_any_change_to_signed_metadata_is_refused(data: st.DataObject):
    """Flipping any byte of a valid push makes it refused, never accepted."""
    raw = bytearray(targets({PATH: (GGUF, custom("m", "1"))}).to_bytes())
    index = data.draw(st.integers(0, len(raw) - 1))
    flip = data.draw(st.integers(1, 255))
    raw[index] ^= flip
    try:
        got = plan(bytes(raw))
    except PushRefused:
        return
    # A flip inside insignificant whitespace leaves the same signed document.
    assert [m.ref for m in got.added] == ["m@1"]
    assert got.blobs[0].sha256 == sha(GGUF)


class TestMatchBlobs:
    def blobs(self) -> tuple[Blob, ...]:
        return plan(targets({PATH: (GGUF, custom("m", "1"))}).to_bytes()).blobs

    def test_the_right_blob_matches(self):
        """A part carrying exactly the target's bytes pairs with it."""
        received = {sha(GGUF): ReceivedBlob(sha(GGUF), sha(GGUF), len(GGUF))}
        ((need, got),) = match_blobs(self.blobs(), received)
        assert got is not None
        assert got.sha256 == need.sha256

    def test_a_part_named_by_a_hash_it_does_not_have_is_a_mismatch(self):
        """Content that does not hash to its part's name is refused as a BlobMismatch."""
        received = {sha(b"x"): ReceivedBlob(sha(GGUF), sha(b"x"), 1)}
        with pytest.raises(BlobMismatch):
            match_blobs(self.blobs(), received)

    def test_a_missing_blob_is_refused_unless_stored_already(self):
        """No part for a needed blob: MissingBlob, or fine if a retried push stored it."""
        with pytest.raises(MissingBlob):
            match_blobs(self.blobs(), {})
        (need,) = self.blobs()
        assert match_blobs([need], {}, present={need.placement}) == [(need, None)]

    def test_an_extra_blob_is_refused(self):
        """A blob no new target needs is refused rather than stored unreferenced."""
        received = {
            sha(GGUF): ReceivedBlob("blob", sha(GGUF), len(GGUF)),
            sha(b"x"): ReceivedBlob("extra", sha(b"x"), 1),
        }
        with pytest.raises(UnexpectedBlob):
            match_blobs(self.blobs(), received)

    def test_bundle_members_are_placed_by_their_hash(self):
        """A bundle manifest's members become blobs under files/, each by its sha256."""
        members = [BundleFile("model.onnx", 3, sha(b"abc")), BundleFile("a/b.json", 2, sha(b"{}"))]
        manifest = build_manifest(members)
        got = plan(
            targets({"models/t/1/bundle.json": (manifest, custom("t", "1", "onnx"))}).to_bytes()
        )
        placed = member_blobs(got.added[0], manifest)
        assert {b.placement for b in placed} == {
            f"models/t/1/files/{sha(b'abc')}",
            f"models/t/1/files/{sha(b'{}')}",
        }
        with pytest.raises(InvalidTarget):
            member_blobs(got.added[0], b"not a manifest")
