"""What a signature covers and which keys may make one: canonical bytes, keyids, director keys.

A signature is over bytes, and a JSON document has many byte forms (key order, whitespace,
escapes). Signer and verifier therefore both sign the canonical form of the parsed ``signed``
object, never the bytes that travelled: OLPC canonical JSON as TUF uses it, from
``securesystemslib.formats.encode_canonical`` (sorted keys, no whitespace, only ``"`` and ``\\``
escaped). It has no floating-point numbers; :func:`canonical_bytes` refuses them with the path
of the offending value, before securesystemslib would refuse them with a bare message.

A keyid is the sha256 hex of the raw 32-byte Ed25519 public key. It is computed here from the
key, never taken from a document: a document's keyid only says which trusted key to try.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical

from edgelm_protocol.errors import InvalidKey, MalformedMessage
from edgelm_protocol.strict_json import JSONObject, check_tree, child_path

ED25519_PUBLIC_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64


def canonical_bytes(value: JSONObject, path: str = "signed") -> bytes:
    """The bytes a signature covers: canonical JSON of the object ``value``, UTF-8 encoded.

    Raises :class:`MalformedMessage` for what canonical JSON cannot hold (floats, non-JSON
    types, lone surrogates), naming the path under ``path``.
    """
    check_tree(value, path)
    _refuse_floats(value, path)
    try:
        text = encode_canonical(value)
    except FormatError as exc:  # not reachable after the checks above; kept as a backstop
        raise MalformedMessage(f"{path} cannot be canonicalised: {exc}", field=path) from exc
    if text is None:  # only returned when an output function is given
        raise AssertionError("encode_canonical returned None without an output function")
    return text.encode("utf-8")


def _refuse_floats(value: object, path: str) -> None:
    if isinstance(value, float):
        raise MalformedMessage(
            f"{path} must be an integer: signed documents hold no floating-point numbers",
            field=path,
        )
    if isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_floats(item, child_path(path, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_floats(item, child_path(path, key))


def key_id(public_key: Ed25519PublicKey) -> str:
    """sha256 hex of the raw 32-byte public key."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()


def sign_canonical(private_key: Ed25519PrivateKey, value: JSONObject) -> tuple[str, str]:
    """Sign ``value``'s canonical bytes; return ``(keyid, signature hex)``."""
    signature = private_key.sign(canonical_bytes(value))
    return key_id(private_key.public_key()), signature.hex()


class DirectorKeys:
    """The director public keys a device trusts, by keyid. Immutable once built.

    A device gets them in its enrollment bundle (PEM) or from provisioning code (raw bytes).
    An empty set is refused: a device that trusts no key could never accept a desired state,
    and that is a provisioning mistake better caught at start-up than at the first rollout.
    """

    __slots__ = ("_by_keyid",)

    def __init__(self, public_keys: Iterable[Ed25519PublicKey]) -> None:
        by_keyid: dict[str, Ed25519PublicKey] = {}
        for public_key in public_keys:
            if not isinstance(public_key, Ed25519PublicKey):
                raise InvalidKey(
                    f"a director key must be an Ed25519 public key, got {type(public_key).__name__}"
                )
            by_keyid[key_id(public_key)] = public_key
        if not by_keyid:
            raise InvalidKey("at least one trusted director key is required, got none")
        self._by_keyid: Mapping[str, Ed25519PublicKey] = MappingProxyType(by_keyid)

    @classmethod
    def from_raw(cls, raw_keys: Iterable[bytes]) -> DirectorKeys:
        """From raw 32-byte Ed25519 public keys."""
        public_keys = []
        for raw in raw_keys:
            if not isinstance(raw, bytes) or len(raw) != ED25519_PUBLIC_KEY_BYTES:
                size = len(raw) if isinstance(raw, bytes) else type(raw).__name__
                raise InvalidKey(f"a raw Ed25519 public key must be 32 bytes, got {size}")
            public_keys.append(Ed25519PublicKey.from_public_bytes(raw))
        return cls(public_keys)

    @classmethod
    def from_pem(cls, pem_keys: Iterable[bytes]) -> DirectorKeys:
        """From PEM ``PUBLIC KEY`` blocks (SubjectPublicKeyInfo), each holding an Ed25519 key."""
        public_keys = []
        for pem in pem_keys:
            try:
                public_key = load_pem_public_key(pem)
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise InvalidKey(f"a director key must be a PEM public key: {exc}") from exc
            if not isinstance(public_key, Ed25519PublicKey):
                raise InvalidKey(f"a director key must be Ed25519, got {type(public_key).__name__}")
            public_keys.append(public_key)
        return cls(public_keys)

    @property
    def keyids(self) -> frozenset[str]:
        return frozenset(self._by_keyid)

    def verifies(self, keyid: str, signature: bytes, payload: bytes) -> bool | None:
        """Whether the trusted key ``keyid`` signed ``payload``; ``None`` if it is not trusted."""
        public_key = self._by_keyid.get(keyid)
        if public_key is None:
            return None
        try:
            public_key.verify(signature, payload)
        except InvalidSignature:
            return False
        return True

    def __contains__(self, keyid: object) -> bool:
        return keyid in self._by_keyid

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_keyid)

    def __len__(self) -> int:
        return len(self._by_keyid)

    def __repr__(self) -> str:
        return f"DirectorKeys({', '.join(sorted(keyid[:16] for keyid in self._by_keyid))})"
