"""Which director key signs desired states: the one the published root names.

The control plane's ``keys_dir`` holds ``director.pem`` (made by ``fleet-init``) and, after
rotations, ``director-N.pem`` (made by ``edgelm provision rotate-keys --role director``, and
copied here by the operator). Old keys stay until the operator removes them. Which one signs:

* the fleet's newest root lists director keys (``x-edgelm-director-keys``, see
  :mod:`edgelm_protocol.root_director`): the last of them whose private key is here;
* it lists none (a fleet that never rotated its director): ``director.pem``.

So the director switches keys exactly when a root naming the new key is published, on every
replica that shares the repository folder (each notices the new ``N.root.json`` with one
``stat`` per signature), and devices learn the key from that same root.
"""

from __future__ import annotations

import re
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import Metadata, Root

from edgelm_control.director import load_director_key
from edgelm_control.errors import ConfigError
from edgelm_protocol import DirectorKeys, key_id
from edgelm_protocol.errors import InvalidKey
from edgelm_protocol.root_director import director_keys_of

log = structlog.get_logger(__name__)

LEGACY_FILE = "director.pem"
_KEY_FILE = re.compile(r"director(?:-[0-9]+)?\.pem")
_ROOT_FILE = re.compile(r"([0-9]+)\.root\.json")


def pem_keyid(pem: str) -> str:
    """The keyid of one PEM public key, as a device computes it (checked by the root's parser)."""
    (keyid,) = DirectorKeys.from_pem([pem.encode()]).keyids
    return keyid


class DirectorKeyring:
    """The director's private keys, by keyid, and the one the published root says to use."""

    def __init__(self, keys_dir: Path, metadata_dir: Path) -> None:
        self.keys_dir = keys_dir
        self.metadata_dir = metadata_dir
        self._keys: dict[str, Ed25519PrivateKey] = {}
        self._legacy: str | None = None
        self._root_version = 0
        self._listed: tuple[str, ...] | None = None  # keyids the newest root lists, in order
        self.reload()

    def reload(self) -> None:
        """Read the key files again (the operator copied a new one in)."""
        keys: dict[str, Ed25519PrivateKey] = {}
        legacy = None
        for path in sorted(self.keys_dir.glob("director*.pem")):
            if not _KEY_FILE.fullmatch(path.name):
                continue
            key = load_director_key(path)
            keyid = key_id(key.public_key())
            keys[keyid] = key
            if path.name == LEGACY_FILE:
                legacy = keyid
        if not keys:
            raise ConfigError(
                f"no director key in {self.keys_dir}: edgelm provision fleet-init writes "
                f"control/keys/{LEGACY_FILE}; copy it there"
            )
        self._keys, self._legacy = keys, legacy

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._keys)

    def signing_key(self) -> Ed25519PrivateKey:
        """The key to sign a desired state with now (see the module docstring)."""
        listed = self._current_listing()
        if listed is None:
            if self._legacy is None:
                raise ConfigError(
                    f"the fleet's root names no director key, and {self.keys_dir} has no "
                    f"{LEGACY_FILE}"
                )
            return self._keys[self._legacy]
        for attempt in range(2):
            for keyid in reversed(listed):
                if keyid in self._keys:
                    return self._keys[keyid]
            if attempt == 0:
                self.reload()
        raise ConfigError(
            f"root v{self._root_version} names the director keys "
            f"{', '.join(k[:16] for k in listed)} and {self.keys_dir} holds none of them: "
            "copy the new director key (DIR/control/keys/director-N.pem) there"
        )

    def _current_listing(self) -> tuple[str, ...] | None:
        if (
            self._root_version == 0
            or (self.metadata_dir / f"{self._root_version + 1}.root.json").exists()
        ):
            self._read_newest_root()
        return self._listed

    def _read_newest_root(self) -> None:
        versions = [
            int(match.group(1))
            for path in self.metadata_dir.glob("*.root.json")
            if (match := _ROOT_FILE.fullmatch(path.name))
        ]
        if not versions:
            raise ConfigError(f"no root metadata in {self.metadata_dir}")
        version = max(versions)
        root = Metadata[Root].from_file(str(self.metadata_dir / f"{version}.root.json")).signed
        try:
            pems = director_keys_of(root)
        except InvalidKey as exc:  # accept_root refuses such a root: someone edited the file
            raise ConfigError(f"{self.metadata_dir}/{version}.root.json: {exc}") from exc
        listed = None if pems is None else tuple(pem_keyid(pem) for pem in pems)
        if listed != self._listed and self._root_version:
            log.info("director_key_switched", root_version=version,
                     keyids=[k[:16] for k in listed or ()])  # fmt: skip
        self._root_version, self._listed = version, listed
