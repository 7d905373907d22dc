"""The director's signed desired state (Uptane's director role): which target a device runs.

The wire form, retained on ``edgelm/v1/{fleet}/dev/{device}/desired``::

    {"signed": {"fleet": "acme", "device": "kiosk-17", "sequence": 42,
                "issued_at": 1795344276, "expires": 1795949076, "rollout": "ro-3f2a" | null,
                "target": {"path": "models/smollm2/1.0/model.gguf", "length": 101376,
                           "hashes": {"sha256": "<hex64>"}} | null},
     "signatures": [{"keyid": "<hex64>", "sig": "<hex128>"}]}

A ``null`` target is a *release*: the fleet assigns the device no model. The device stops any
download in progress and undoes what the named rollout switched: it goes back to the model it
ran before, or serves none if it ran none. It is signed and sequenced like any other desired
state, so an attacker cannot forge or replay one (an empty retained message could not say
which rollout it undoes, nor be told apart from a broker that lost its state).

:func:`verify_desired` decides whether a device may act on a document. The broker is not
trusted (whoever owns it can publish anything, replay anything and withhold anything), so the
checks are, in this order, each failure its own error:

1. a signature verifies against a trusted director key   -> :class:`ForgedDesiredState`
2. the fleet and device are the caller's                 -> :class:`WrongDevice`
3. the sequence is above the last one applied            -> :class:`StaleDesiredState`
4. it has not expired at the caller's reference time     -> :class:`ExpiredDesiredState`

The signature comes first, as in TUF: nothing inside ``signed`` is interpreted before it is
known to come from the director. A signed document that does not match the schema is a director
bug and raises :class:`MalformedMessage`. The fifth check (the target is in verified TUF
metadata with the same length and hashes) needs the registry, so the agent does it.

Everything here is pure: the caller passes the keys, its ids, the last applied sequence and the
reference time. The agent gives max(wall clock, the ``issued_at`` of the last desired state it
applied): a Pi has no RTC, and a clock reset to 1970 must not make an old state look fresh.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Self

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgelm_protocol.errors import (
    ExpiredDesiredState,
    ForgedDesiredState,
    MalformedMessage,
    StaleDesiredState,
    WrongDevice,
    shown,
)
from edgelm_protocol.ids import (
    SHA256_PATTERN,
    check_device_id,
    check_fleet_id,
    check_rollout_id,
)
from edgelm_protocol.schema import MAX_SAFE_INT, ObjectReader, check_text
from edgelm_protocol.signing import DirectorKeys, canonical_bytes, sign_canonical
from edgelm_protocol.strict_json import JSONObject, JSONValue
from edgelm_protocol.topics import MessageType

MAX_SIGNATURES = 16
KEYID_PATTERN = SHA256_PATTERN
SIGNATURE_PATTERN = re.compile(r"[0-9a-f]{128}")
# A TUF target path: relative, "/"-separated, each segment in the registry's file alphabet.
# No empty, "." or ".." segments, no leading "/", no backslash: it must not escape a directory.
_TARGET_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_MAX_TARGET_SEGMENTS = 8


def _check_target_path(value: object, path: str) -> str:
    text = check_text(value, path, max_chars=512)
    segments = text.split("/")
    if len(segments) > _MAX_TARGET_SEGMENTS or not all(
        _TARGET_SEGMENT.fullmatch(segment) and ".." not in segment for segment in segments
    ):
        raise MalformedMessage(
            f"{path} must be a relative path of 1 to {_MAX_TARGET_SEGMENTS} segments of "
            f"A-Z a-z 0-9 . _ + - (no '..'), got {shown(text)}",
            field=path,
        )
    return text


@dataclass(frozen=True)
class TargetRef:
    """The TUF target the device must run: its path, length and sha256."""

    path: str
    length: int
    sha256: str

    @classmethod
    def from_json(cls, value: object, path: str = "signed.target") -> Self:
        reader = ObjectReader(value, path, ("path", "length", "hashes"))
        hashes = reader.nested("hashes", ("sha256",))
        return cls(
            path=_check_target_path(reader.raw("path"), reader.at("path")),
            length=reader.integer("length"),
            sha256=hashes.pattern("sha256", SHA256_PATTERN, "64 lower-case hex"),
        )

    def to_json(self) -> JSONObject:
        return {"path": self.path, "length": self.length, "hashes": {"sha256": self.sha256}}


@dataclass(frozen=True)
class DesiredState:
    """The ``signed`` part: what one device should run. Times are integer Unix seconds."""

    fleet: str
    device: str
    sequence: int
    issued_at: int
    expires: int
    rollout: str | None
    target: TargetRef | None  # None: a release (see the module docstring)

    @classmethod
    def from_json(cls, value: object, path: str = "signed") -> Self:
        keys = ("fleet", "device", "sequence", "issued_at", "expires", "rollout", "target")
        reader = ObjectReader(value, path, keys)
        issued_at = reader.integer("issued_at")
        expires = reader.integer("expires")
        if expires <= issued_at:
            raise MalformedMessage(
                f"{reader.at('expires')} must be after issued_at {issued_at}, got {expires}",
                field=reader.at("expires"),
            )
        return cls(
            fleet=reader.identifier("fleet", check_fleet_id),
            device=reader.identifier("device", check_device_id),
            # 0 is what a device reports when it has applied nothing, so real states start at 1.
            sequence=reader.integer("sequence", minimum=1, maximum=MAX_SAFE_INT),
            issued_at=issued_at,
            expires=expires,
            rollout=reader.optional_identifier("rollout", check_rollout_id),
            target=None
            if reader.raw("target") is None
            else TargetRef.from_json(reader.raw("target"), reader.at("target")),
        )

    def to_json(self) -> JSONObject:
        return {
            "fleet": self.fleet,
            "device": self.device,
            "sequence": self.sequence,
            "issued_at": self.issued_at,
            "expires": self.expires,
            "rollout": self.rollout,
            "target": None if self.target is None else self.target.to_json(),
        }


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: str

    def to_json(self) -> JSONObject:
        return {"keyid": self.keyid, "sig": self.sig}


@dataclass(frozen=True)
class DesiredDocument:
    """The ``desired`` envelope body: a signed document, checked for shape only.

    ``signed`` stays a plain JSON object until :func:`verify_desired` has checked a signature
    over it; only then is it read as a :class:`DesiredState`. A document with no signatures is
    well-formed (and refused by :func:`verify_desired` as forged).
    """

    TYPE: ClassVar[MessageType] = MessageType.DESIRED

    signed: JSONObject
    signatures: tuple[Signature, ...]

    @classmethod
    def from_json(cls, value: object, path: str = "body") -> Self:
        reader = ObjectReader(value, path, ("signed", "signatures"))
        signatures = []
        for item_path, item in reader.items("signatures", min_items=0, max_items=MAX_SIGNATURES):
            entry = ObjectReader(item, item_path, ("keyid", "sig"))
            signatures.append(
                Signature(
                    keyid=entry.pattern("keyid", KEYID_PATTERN, "64 lower-case hex"),
                    sig=entry.pattern("sig", SIGNATURE_PATTERN, "128 lower-case hex"),
                )
            )
        return cls(signed=reader.json_object("signed"), signatures=tuple(signatures))

    def to_json(self) -> JSONObject:
        signatures: list[JSONValue] = [signature.to_json() for signature in self.signatures]
        return {"signed": self.signed, "signatures": signatures}


def sign_desired(state: DesiredState, private_key: Ed25519PrivateKey) -> JSONObject:
    """The signed document for ``state``, as the director publishes it.

    ``state`` is checked with the same reader a device uses first, so the director cannot sign
    what every device would refuse.
    """
    signed = state.to_json()
    DesiredState.from_json(signed)
    keyid, signature = sign_canonical(private_key, signed)
    return DesiredDocument(signed=signed, signatures=(Signature(keyid, signature),)).to_json()


def verify_desired(
    document: DesiredDocument | Mapping[str, object],
    *,
    keys: DirectorKeys,
    fleet: str,
    device: str,
    last_applied: int,
    now: int,
) -> DesiredState:
    """The desired state in ``document``, if this device may act on it; else a typed error.

    ``last_applied`` is the sequence of the last desired state the device applied (0 if none);
    ``now`` is the reference time in integer Unix seconds. See the module docstring for the
    order of the checks.
    """
    check_fleet_id(fleet)
    check_device_id(device)
    _check_caller_int("last_applied", last_applied)
    _check_caller_int("now", now)
    if not isinstance(document, DesiredDocument):
        document = DesiredDocument.from_json(dict(document), path="")

    _check_signatures(document, keys)
    state = DesiredState.from_json(document.signed, "signed")
    if state.fleet != fleet or state.device != device:
        raise WrongDevice(
            fleet=state.fleet,
            device=state.device,
            expected_fleet=fleet,
            expected_device=device,
            sequence=state.sequence,
        )
    if state.sequence <= last_applied:
        raise StaleDesiredState(sequence=state.sequence, last_applied=last_applied)
    if now >= state.expires:  # as python-tuf: expired at the instant of ``expires``
        raise ExpiredDesiredState(expires=state.expires, now=now, sequence=state.sequence)
    return state


def _check_caller_int(name: str, value: object) -> None:
    # The caller's own bookkeeping, not wire data: a wrong type here is a bug, not an attack.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _check_signatures(document: DesiredDocument, keys: DirectorKeys) -> None:
    keyids = tuple(signature.keyid for signature in document.signatures)
    if not document.signatures:
        raise ForgedDesiredState("the document has no signatures", keyids=keyids)
    payload = canonical_bytes(document.signed, "signed")
    failed: list[str] = []
    for signature in document.signatures:
        verified = keys.verifies(signature.keyid, bytes.fromhex(signature.sig), payload)
        if verified:
            return
        if verified is False:
            failed.append(signature.keyid)
    if failed:
        reason = f"the signature by trusted key {failed[0][:16]} does not verify"
    else:
        reason = f"no signature is by a trusted key (keyids: {_short(keyids)})"
    raise ForgedDesiredState(reason, keyids=keyids)


def _short(keyids: tuple[str, ...]) -> str:
    return ", ".join(keyid[:16] for keyid in keyids)
