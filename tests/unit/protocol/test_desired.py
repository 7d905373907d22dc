"""The signed desired state: keys, canonical bytes, signing, and every way to attack a device.

The attacker owns the broker: it can publish any document on any device's desired topic,
replay old ones and make up keyids. Each attack is refused with its own error class, and a
refusal changes nothing (verify_desired is pure; the tests check the document too).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from securesystemslib.formats import encode_canonical

from edgelm_protocol import (
    Channel,
    DesiredDocument,
    DesiredState,
    DirectorKeys,
    Envelope,
    ExpiredDesiredState,
    ForgedDesiredState,
    InvalidId,
    InvalidKey,
    JSONObject,
    MalformedMessage,
    ProtocolError,
    StaleDesiredState,
    TargetRef,
    Topic,
    WrongDevice,
    canonical_bytes,
    decode,
    encode,
    key_id,
    sign_desired,
    verify_desired,
)
from edgelm_protocol.signing import sign_canonical
from tests.unit.protocol import strategies


def private_key(seed: int) -> Ed25519PrivateKey:
    """A fixed key per seed, so failures reproduce."""
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


DIRECTOR = private_key(1)
SECOND_DIRECTOR = private_key(2)
ATTACKER = private_key(66)
KEYS = DirectorKeys([DIRECTOR.public_key()])
NOW = 1_795_344_286
STATE = DesiredState(
    fleet="acme",
    device="kiosk-17",
    sequence=42,
    issued_at=1_795_344_276,
    expires=1_795_949_076,
    rollout="ro-3f2a",
    target=TargetRef(path="models/smollm2/1.0/model.gguf", length=101_376, sha256="ab" * 32),
)


def state(**changes: Any) -> DesiredState:
    return dataclasses.replace(STATE, **changes)


def sign(desired: DesiredState, key: Ed25519PrivateKey = DIRECTOR) -> dict[str, Any]:
    """sign_desired, typed loosely so tests can reach into the document to tamper with it."""
    return sign_desired(desired, key)


def verify(document: Any, **changes: Any) -> DesiredState:
    """verify_desired as kiosk-17 of acme, which last applied sequence 41."""
    arguments: dict[str, Any] = {
        "keys": KEYS,
        "fleet": "acme",
        "device": "kiosk-17",
        "last_applied": 41,
        "now": NOW,
    }
    arguments.update(changes)
    return verify_desired(document, **arguments)


def refused(error_class: type[Exception], document: Any, **changes: Any) -> Any:
    """The error verify raises, after checking that the document was left as it was."""
    before = copy.deepcopy(document)
    with pytest.raises(error_class) as caught:
        verify(document, **changes)
    assert document == before
    return caught.value


def verify_or_error(document: Any) -> DesiredState | ProtocolError:
    try:
        return verify(document)
    except ProtocolError as exc:
        return exc


def signed_by(key: Ed25519PrivateKey, signed: dict[str, Any], keyid: str | None = None) -> Any:
    """A document over any ``signed`` object, signed raw (bypassing sign_desired's checks)."""
    actual_keyid, signature = sign_canonical(key, signed)
    return {"signed": signed, "signatures": [{"keyid": keyid or actual_keyid, "sig": signature}]}


class TestVerifyDesired:
    def test_valid_state_is_accepted(self) -> None:
        """A state signed by the director, for this device, newer and unexpired, is returned."""
        assert verify(sign(STATE)) == STATE

    def test_state_survives_any_json_formatting(self) -> None:
        """Key order and whitespace on the wire do not matter: the canonical form is signed."""
        document = sign(STATE)
        reformatted = json.dumps(document, indent=2, sort_keys=True).encode()
        topic = Topic.for_device("acme", "kiosk-17", Channel.DESIRED)
        envelope_bytes = encode(
            Envelope(
                id="0" * 32,
                sender="control",
                ts_ms=0,
                body=DesiredDocument.from_json(json.loads(reformatted)),
            )
        )
        body = decode(topic, envelope_bytes).body
        assert isinstance(body, DesiredDocument)
        assert verify(body) == STATE

    def test_any_trusted_key_will_do(self) -> None:
        """With two trusted directors, a signature by either is enough."""
        keys = DirectorKeys([DIRECTOR.public_key(), SECOND_DIRECTOR.public_key()])
        assert verify(sign(STATE, SECOND_DIRECTOR), keys=keys) == STATE

    def test_wrong_key_is_forged(self) -> None:
        """A state signed by a key the device does not trust is refused."""
        error = refused(ForgedDesiredState, sign(STATE, ATTACKER))
        assert error.keyids == (key_id(ATTACKER.public_key()),)
        assert "no signature is by a trusted key" in error.reason
        assert error.code == "forged_desired_state"

    def test_no_signature_is_forged(self) -> None:
        """An unsigned document is refused."""
        document = {"signed": STATE.to_json(), "signatures": []}
        error = refused(ForgedDesiredState, document)
        assert (error.reason, error.keyids) == ("the document has no signatures", ())

    def test_missing_signatures_key_is_malformed(self) -> None:
        """A document without its signatures list is not a signed document at all."""
        error = refused(MalformedMessage, {"signed": STATE.to_json()})
        assert error.field == "signatures"

    def test_tampered_payload_is_forged(self) -> None:
        """Changing the target's hash after signing breaks the signature."""
        document = sign(STATE)
        document["signed"]["target"]["hashes"]["sha256"] = "cd" * 32
        error = refused(ForgedDesiredState, document)
        assert "does not verify" in error.reason

    def test_signature_over_other_bytes_is_forged(self) -> None:
        """A genuine signature moved onto another state does not verify."""
        genuine = sign(state(sequence=43, rollout=None))
        document = {"signed": STATE.to_json(), "signatures": genuine["signatures"]}
        refused(ForgedDesiredState, document)

    def test_forged_keyid_is_forged(self) -> None:
        """An attacker's signature that claims the director's keyid is refused."""
        director_keyid = key_id(DIRECTOR.public_key())
        document = signed_by(ATTACKER, STATE.to_json(), keyid=director_keyid)
        error = refused(ForgedDesiredState, document)
        assert error.keyids == (director_keyid,)
        assert "does not verify" in error.reason

    def test_one_good_signature_among_bad_ones_is_enough(self) -> None:
        """Untrusted or broken signatures beside a valid one do not spoil it."""
        document = sign(STATE)
        document["signatures"].insert(0, sign(STATE, ATTACKER)["signatures"][0])
        assert verify(document) == STATE

    def test_replayed_older_sequence_is_stale(self) -> None:
        """A genuine but older state (a replay or reorder) is refused."""
        error = refused(StaleDesiredState, sign(state(sequence=40)))
        assert (error.sequence, error.last_applied) == (40, 41)

    def test_equal_sequence_is_stale(self) -> None:
        """The state already applied is not applied again."""
        error = refused(StaleDesiredState, sign(state(sequence=41)))
        assert (error.sequence, error.last_applied) == (41, 41)

    def test_another_devices_state_is_refused(self) -> None:
        """kiosk-18's genuine state, replayed onto kiosk-17's topic, is refused."""
        error = refused(WrongDevice, sign(state(device="kiosk-18")))
        assert (error.device, error.expected_device) == ("kiosk-18", "kiosk-17")
        assert error.sequence == 42

    def test_another_fleets_state_is_refused(self) -> None:
        """A state for the same device id in another fleet is refused."""
        error = refused(WrongDevice, sign(state(fleet="globex")))
        assert (error.fleet, error.expected_fleet) == ("globex", "acme")

    @pytest.mark.parametrize("now", [STATE.expires, STATE.expires + 1, 2**40])
    def test_expired_state_is_refused(self, now: int) -> None:
        """At or after expires, the state is refused; expiry is inclusive, as in python-tuf."""
        error = refused(ExpiredDesiredState, sign(STATE), now=now)
        assert (error.expires, error.now, error.sequence) == (STATE.expires, now, 42)

    def test_one_second_before_expiry_is_accepted(self) -> None:
        """The last second before expires still counts."""
        assert verify(sign(STATE), now=STATE.expires - 1) == STATE

    def test_checks_run_in_the_documented_order(self) -> None:
        """Signature, then fleet and device, then sequence, then expiry."""
        stale_wrong_device = state(device="kiosk-18", sequence=1)
        refused(ForgedDesiredState, sign(stale_wrong_device, ATTACKER))
        refused(WrongDevice, sign(stale_wrong_device))
        refused(StaleDesiredState, sign(state(sequence=1)), now=2**40)

    def test_signed_but_malformed_state_is_malformed(self) -> None:
        """A director bug (a missing field) is reported by path after the signature checks."""
        signed = STATE.to_json()
        del signed["rollout"]
        error = refused(MalformedMessage, signed_by(DIRECTOR, signed))
        assert error.field == "signed.rollout"

    def test_floats_cannot_be_signed_or_verified(self) -> None:
        """Canonical JSON has no floats, so a float in signed is refused by path."""
        signed = STATE.to_json() | {"sequence": 42.0}
        document = {"signed": signed, "signatures": [{"keyid": "a" * 64, "sig": "b" * 128}]}
        assert refused(MalformedMessage, document).field == "signed.sequence"

    @given(bad=strategies.bad_ids(), field=st.sampled_from(["fleet", "device", "rollout"]))
    def test_bad_ids_in_a_signed_state_are_refused(self, bad: str, field: str) -> None:
        """Even the director's own signature cannot carry an id with a wildcard or control char."""
        signed = STATE.to_json() | {field: bad}
        error = refused(MalformedMessage, signed_by(DIRECTOR, signed))
        assert error.field == f"signed.{field}"

    @given(bad=strategies.bad_ids())
    def test_bad_ids_from_the_caller_are_refused(self, bad: str) -> None:
        """The device's own fleet and device ids are checked too."""
        with pytest.raises(InvalidId):
            verify(sign(STATE), device=bad)
        with pytest.raises(InvalidId):
            verify(sign(STATE), fleet=bad)

    @given(
        field=st.sampled_from(["fleet", "device", "sequence", "issued_at", "expires", "rollout"]),
        value=st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    )
    def test_any_change_after_signing_is_forged(self, field: str, value: object) -> None:
        """Whatever field is changed to whatever value, the signature no longer verifies."""
        document = sign(STATE)
        if document["signed"][field] == value and type(document["signed"][field]) is type(value):
            return  # not a change
        document["signed"][field] = value
        outcome = verify_or_error(document)
        # Lone surrogates cannot even be canonicalised; every other change breaks the signature.
        assert isinstance(outcome, ForgedDesiredState | MalformedMessage), outcome
        if isinstance(outcome, MalformedMessage):
            assert outcome.field == f"signed.{field}"

    @given(
        field=st.sampled_from([*STATE.to_json(), "signed", "signatures"]),
        value=strategies.hostile_json_values,
    )
    def test_hostile_documents_only_ever_raise_protocol_errors(
        self, field: str, value: object
    ) -> None:
        """Any value in any field of a signed document is accepted only if genuine, else refused."""
        document = sign(STATE)
        if field in {"signed", "signatures"}:
            document[field] = value
        else:
            document["signed"][field] = value
        outcome = verify_or_error(document)
        assert outcome == STATE or isinstance(outcome, ProtocolError)

    @pytest.mark.parametrize(("name", "value"), [("last_applied", -1), ("now", "1"), ("now", True)])
    def test_caller_bookkeeping_must_be_ints(self, name: str, value: object) -> None:
        """A wrong last_applied or now is a bug in the caller: ValueError, not a wire error."""
        with pytest.raises(ValueError, match=name):
            verify(sign(STATE), **{name: value})


class TestSignDesired:
    def test_document_shape(self) -> None:
        """{signed, signatures: [{keyid, sig}]} with the director's keyid."""
        document = sign(STATE)
        assert document["signed"] == STATE.to_json()
        [signature] = document["signatures"]
        assert signature["keyid"] == key_id(DIRECTOR.public_key())
        assert len(signature["sig"]) == 128

    def test_signature_is_over_the_canonical_bytes(self) -> None:
        """The signature verifies with plain cryptography over securesystemslib's canonical form."""
        document = sign(STATE)
        payload = encode_canonical(document["signed"])
        assert payload is not None
        public_key = DIRECTOR.public_key()
        public_key.verify(bytes.fromhex(document["signatures"][0]["sig"]), payload.encode())

    def test_signing_is_deterministic(self) -> None:
        """Ed25519 gives the same document for the same state and key."""
        assert sign(STATE) == sign(STATE)

    @pytest.mark.parametrize(
        ("changes", "field"),
        [
            ({"expires": STATE.issued_at}, "signed.expires"),
            ({"sequence": 0}, "signed.sequence"),
            ({"device": "kiosk/17"}, "signed.device"),
        ],
    )
    def test_states_a_device_would_refuse_are_not_signed(
        self, changes: dict[str, object], field: str
    ) -> None:
        """The director runs the device's schema checks before signing."""
        with pytest.raises(MalformedMessage) as caught:
            sign(state(**changes))
        assert caught.value.field == field

    @given(desired=strategies.desired_states(fleet="acme", device="kiosk-17"))
    def test_signed_states_verify(self, desired: DesiredState) -> None:
        """Every valid state the director signs verifies on its device."""
        now = desired.issued_at
        assert verify(sign(desired), last_applied=0, now=now) == desired


def target_json(**changes: object) -> dict[str, object]:
    assert STATE.target is not None
    return STATE.target.to_json() | changes


class TestDesiredState:
    def test_a_release_is_signed_and_verified_like_any_state(self) -> None:
        """A null target (a release) verifies, and its signature covers the null: nobody can
        turn an assignment into a release, or back, without the director key."""
        release = dataclasses.replace(STATE, target=None)
        document = sign(release)
        assert document["signed"]["target"] is None
        assert verify(document, last_applied=0, now=release.issued_at).target is None
        forged = sign(STATE)
        forged["signed"]["target"] = None
        with pytest.raises(ForgedDesiredState):
            verify(forged, last_applied=0, now=STATE.issued_at)

    @given(desired=strategies.desired_states())
    def test_round_trip(self, desired: DesiredState) -> None:
        """from_json(to_json(x)) == x."""
        assert DesiredState.from_json(desired.to_json()) == desired

    @pytest.mark.parametrize(
        "path",
        ["../etc/passwd", "/models/a/1/m", "models//m", "models\\a\\m", "models/./m",
         "models/a..b/m", "", "models/a/1/m\n", "a/b/c/d/e/f/g/h/i"],
    )  # fmt: skip
    def test_unsafe_target_paths_are_refused(self, path: str) -> None:
        """A target path cannot climb, start at the root, hold empty parts or control chars."""
        signed = STATE.to_json() | {"target": target_json(path=path)}
        with pytest.raises(MalformedMessage) as caught:
            DesiredState.from_json(signed)
        assert caught.value.field == "signed.target.path"

    def test_hashes_hold_exactly_sha256(self) -> None:
        """Other hash algorithms are refused rather than silently ignored."""
        hashes = {"sha256": "ab" * 32, "md5": "00" * 16}
        signed = STATE.to_json() | {"target": target_json(hashes=hashes)}
        with pytest.raises(MalformedMessage) as caught:
            DesiredState.from_json(signed)
        assert caught.value.field == "signed.target.hashes.md5"


class TestDesiredDocument:
    @given(document=strategies.desired_documents)
    def test_round_trip(self, document: DesiredDocument) -> None:
        """from_json(to_json(x)) == x."""
        assert DesiredDocument.from_json(document.to_json()) == document

    def test_signature_entries_are_hex_of_the_right_length(self) -> None:
        """A keyid is 64 hex characters and a signature 128."""
        document = sign(STATE)
        document["signatures"][0]["sig"] = document["signatures"][0]["sig"][:-2]
        with pytest.raises(MalformedMessage) as caught:
            DesiredDocument.from_json(document)
        assert caught.value.field == "body.signatures[0].sig"

    def test_at_most_sixteen_signatures(self) -> None:
        """A document cannot make the device try thousands of signatures."""
        document = sign(STATE)
        document["signatures"] *= 17
        with pytest.raises(MalformedMessage, match="0 to 16 items"):
            DesiredDocument.from_json(document)


class TestDirectorKeys:
    def test_keyid_is_sha256_of_the_raw_public_key(self) -> None:
        """The keyid is computed from the key, as docs/protocol.md says."""
        raw = DIRECTOR.public_key().public_bytes_raw()
        assert key_id(DIRECTOR.public_key()) == hashlib.sha256(raw).hexdigest()
        assert KEYS.keyids == {hashlib.sha256(raw).hexdigest()}

    def test_raw_and_pem_give_the_same_keys(self) -> None:
        """A key loaded from raw bytes or from PEM has the same keyid."""
        public_key = DIRECTOR.public_key()
        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        from_pem = DirectorKeys.from_pem([pem])
        from_raw = DirectorKeys.from_raw([public_key.public_bytes_raw()])
        assert set(from_pem) == set(from_raw) == set(KEYS)
        assert len(from_pem) == 1
        assert key_id(public_key) in from_pem

    def test_no_keys_is_refused(self) -> None:
        """A device that trusts no director could never accept a state."""
        with pytest.raises(InvalidKey, match="at least one"):
            DirectorKeys([])

    @pytest.mark.parametrize("raw", [b"", b"\x01" * 31, b"\x01" * 33])
    def test_raw_keys_are_32_bytes(self, raw: bytes) -> None:
        """A raw key of any other length is refused."""
        with pytest.raises(InvalidKey, match="32 bytes"):
            DirectorKeys.from_raw([raw])

    def test_garbage_pem_is_refused(self) -> None:
        """Bytes that are not PEM are an InvalidKey."""
        with pytest.raises(InvalidKey, match="PEM"):
            DirectorKeys.from_pem([b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"])

    def test_other_algorithms_are_refused(self) -> None:
        """An ECDSA key in PEM is refused: director keys are Ed25519."""
        pem = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        with pytest.raises(InvalidKey, match="Ed25519"):
            DirectorKeys.from_pem([pem])

    def test_verifies_distinguishes_unknown_bad_and_good(self) -> None:
        """None for an untrusted keyid, False for a bad signature, True for a good one."""
        keyid = key_id(DIRECTOR.public_key())
        signature = DIRECTOR.sign(b"payload")
        assert KEYS.verifies("0" * 64, signature, b"payload") is None
        assert KEYS.verifies(keyid, signature, b"other") is False
        assert KEYS.verifies(keyid, signature, b"payload") is True


class TestCanonicalBytes:
    def test_sorted_keys_without_whitespace(self) -> None:
        """OLPC canonical JSON: sorted keys, no spaces, UTF-8."""
        value: JSONObject = {"b": 1, "a": [True, None, "é"]}
        assert canonical_bytes(value) == b'{"a":[true,null,"\xc3\xa9"],"b":1}'

    @given(value=strategies.canonical_objects)
    def test_key_order_does_not_matter(self, value: JSONObject) -> None:
        """Two dicts with the same items in another order give the same bytes."""
        reordered = dict(reversed(list(value.items())))
        assert canonical_bytes(reordered) == canonical_bytes(value)
        assert canonical_bytes(value) == str(encode_canonical(value)).encode()

    def test_floats_are_refused_by_path(self) -> None:
        """A float anywhere is refused, naming where."""
        with pytest.raises(MalformedMessage) as caught:
            canonical_bytes({"target": {"length": [1, 2.5]}})
        assert caught.value.field == "signed.target.length[1]"

    def test_lone_surrogates_are_refused(self) -> None:
        """Text that cannot be UTF-8 cannot be signed."""
        with pytest.raises(MalformedMessage, match="lone surrogate"):
            canonical_bytes({"rollout": "\udc80"})
