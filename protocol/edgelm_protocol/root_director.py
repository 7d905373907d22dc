"""The director keys a fleet's TUF root vouches for: a custom field of root's signed part.

Uptane gives the director its own role; TUF's root lists only its four top-level roles
(python-tuf's ``Root`` refuses others), but keeps every unknown key of ``signed`` in
``Root.unrecognized_fields``, and those keys are covered by root's signatures like the rest.
So the fleet's root carries, beside ``roles``::

    "x-edgelm-director-keys": ["-----BEGIN PUBLIC KEY-----\\n...", ...]

PEM public keys (SubjectPublicKeyInfo, Ed25519), in the order the operator listed them: the
control plane signs desired states with the last one whose private key it holds. A device
trusts exactly these once a verified root carries the field (root is threshold-signed by
the offline root keys), and the keys of its enrollment bundle only while no verified root
carries it. Rotating the director is therefore a new root version, published and walked like
any other; a key never comes from a message on the broker.

A root without the field (every fleet made before rotation existed) says nothing about the
director: :func:`director_keys_of` returns ``None`` and the bundle's keys stand.
"""

from __future__ import annotations

from collections.abc import Sequence

from tuf.api.metadata import Root

from edgelm_protocol.errors import InvalidKey
from edgelm_protocol.signing import DirectorKeys

DIRECTOR_KEYS_FIELD = "x-edgelm-director-keys"
#: More would be a mistake (a rotation overlaps two keys at most); the bound keeps a hostile
#: or broken root from making every device parse thousands of keys.
MAX_DIRECTOR_KEYS = 8


def director_keys_of(root: Root) -> tuple[str, ...] | None:
    """The PEM director keys ``root`` lists, checked; ``None`` if it has no such field.

    Raises :class:`InvalidKey` when the field is there but unusable (not a list of 1 to
    :data:`MAX_DIRECTOR_KEYS` Ed25519 PEM public keys): a root that names no usable director
    key must not silently leave the old one trusted.
    """
    if DIRECTOR_KEYS_FIELD not in root.unrecognized_fields:
        return None
    return _checked(root.unrecognized_fields[DIRECTOR_KEYS_FIELD], root.version)


def director_keyring_of(root: Root) -> DirectorKeys | None:
    """:func:`director_keys_of`, as the verifier :func:`~edgelm_protocol.verify_desired` takes."""
    pems = director_keys_of(root)
    return None if pems is None else DirectorKeys.from_pem([pem.encode() for pem in pems])


def set_director_keys(root: Root, pems: Sequence[str]) -> None:
    """List ``pems`` as the fleet's director keys in ``root``, checked as a device checks
    them first (``root`` is left as it was if they are refused)."""
    root.unrecognized_fields[DIRECTOR_KEYS_FIELD] = list(_checked(list(pems), root.version))


def _checked(value: object, version: int) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_DIRECTOR_KEYS
        or not all(isinstance(pem, str) for pem in value)
    ):
        size = f" of {len(value)}" if isinstance(value, list) else ""
        raise InvalidKey(
            f"root v{version}: {DIRECTOR_KEYS_FIELD} must be a list of 1 to "
            f"{MAX_DIRECTOR_KEYS} PEM public keys, got {type(value).__name__}{size}"
        )
    try:
        DirectorKeys.from_pem([pem.encode() for pem in value])
    except InvalidKey as exc:
        raise InvalidKey(f"root v{version}: {DIRECTOR_KEYS_FIELD}: {exc.reason}") from exc
    return tuple(value)
