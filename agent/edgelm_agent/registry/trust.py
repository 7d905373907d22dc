"""Verified model targets from a TUF repository, through python-tuf's ngclient.

ngclient does the TUF client workflow (root rotation, timestamp, snapshot, targets, with
signatures, thresholds, versions, expiry, lengths and hashes). Around it we add three things:

* the fetcher that tries each mirror in order (:mod:`edgelm_agent.registry.mirrors`);
* the reference time from the last-known-good clock (:mod:`edgelm_agent.registry.clock`):
  ngclient judges expiry by the wall clock, which a Pi without an RTC cannot trust. python-tuf
  has no public setting for it, so we set the trusted set's ``reference_time`` right after
  construction, before any metadata is loaded; the pinned python-tuf version keeps that stable;
* translation of python-tuf's exceptions into the registry's own, by class, never by message.

ngclient keeps the newest root it verified as ``metadata/root.json`` (each version under
``metadata/root_history/``), having walked every ``N+1.root.json`` the repository serves, each
signed by a threshold of the previous root's keys and of its own. :func:`trusted_root_director_keys`
reads the fleet's director keys from that root: the only place a fleet device learns them
after enrollment (see :mod:`edgelm_protocol.root_director`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import Updater, UpdaterConfig

from edgelm_agent.registry.clock import LastKnownGoodClock
from edgelm_agent.registry.errors import (
    DownloadError,
    ExpiredMetadata,
    MetadataTooLarge,
    RegistryError,
    RepositoryError,
    RollbackAttack,
    TargetMismatch,
    VerificationError,
)
from edgelm_agent.registry.mirrors import MIRROR_URL, MirrorFetcher
from edgelm_agent.registry.model_target import ModelTarget, parse_model_target
from edgelm_protocol.errors import InvalidKey
from edgelm_protocol.root_director import director_keys_of


@dataclass(frozen=True)
class TrustLimits:
    """Hard size limits on metadata, in bytes: an endless-data attack stops here."""

    root_max_bytes: int = 512_000
    timestamp_max_bytes: int = 16_384
    snapshot_max_bytes: int = 2_000_000
    targets_max_bytes: int = 5_000_000

    def updater_config(self) -> UpdaterConfig:
        return UpdaterConfig(
            root_max_length=self.root_max_bytes,
            timestamp_max_length=self.timestamp_max_bytes,
            snapshot_max_length=self.snapshot_max_bytes,
            targets_max_length=self.targets_max_bytes,
            app_user_agent="edgelm-agent",
        )


# python-tuf's exception → ours, with what the message says. Subclasses come before their
# bases (DownloadLengthMismatchError is a DownloadError): the first match wins.
_TRANSLATIONS: tuple[tuple[type[Exception], type[RegistryError], str], ...] = (
    (tuf_exceptions.UnsignedMetadataError, VerificationError, "metadata signature check failed"),
    (tuf_exceptions.BadVersionNumberError, RollbackAttack, "metadata version check failed"),
    (tuf_exceptions.ExpiredMetadataError, ExpiredMetadata, "metadata has expired"),
    (tuf_exceptions.LengthOrHashMismatchError, TargetMismatch, "length or hash mismatch"),
    (tuf_exceptions.DownloadLengthMismatchError, MetadataTooLarge, "metadata over its size limit"),
    (tuf_exceptions.DownloadError, DownloadError, "cannot fetch metadata"),
)


def translate(exc: Exception) -> RegistryError:
    """The most specific registry error for a python-tuf exception."""
    message = str(exc) or type(exc).__name__
    for theirs, ours, what in _TRANSLATIONS:
        if isinstance(exc, theirs):
            return ours(f"{what}: {message}")
    return RepositoryError(f"repository metadata is invalid: {message}")


class TrustClient:
    def __init__(
        self,
        metadata_dir: Path,
        anchor_root: bytes,
        mirrors: list[str],
        clock: LastKnownGoodClock,
        limits: TrustLimits | None = None,
    ) -> None:
        self.metadata_dir = metadata_dir
        self.anchor_root = anchor_root
        self.mirrors = mirrors
        self.clock = clock
        self.limits = limits or TrustLimits()

    def refresh(self) -> dict[str, ModelTarget]:
        """Fetch and verify the newest metadata; return every model target it lists.

        A target that is signed but unusable (bad path, missing custom fields) is left out of
        the result and reported by :meth:`target`, so one bad entry cannot hide the others.
        """
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        reference = self.clock.reference_time()
        try:
            updater = Updater(
                str(self.metadata_dir),
                MIRROR_URL + "metadata/",
                fetcher=MirrorFetcher(self.mirrors),
                config=self.limits.updater_config(),
                bootstrap=self.anchor_root,
            )
            updater._trusted_set.reference_time = reference  # see the module docstring
            updater.refresh()
            raw_targets = updater._trusted_set.targets.targets
        except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError, ValueError) as exc:
            raise translate(exc) from exc
        # Fresh signed metadata was valid at `reference`, so that moment is known good. A wall
        # clock far in the future cannot stick: the metadata would have been expired then.
        self.clock.advance(reference)
        self._raw = {
            path: (info.length, dict(info.hashes), info.unrecognized_fields.get("custom"))
            for path, info in raw_targets.items()
        }
        targets = {}
        for path in self._raw:
            try:
                targets[path] = self.target(path)
            except RepositoryError:
                continue
        return targets

    def paths(self) -> list[str]:
        """Every target path the last refresh's signed metadata lists, usable or not."""
        return list(self._raw)

    def target(self, path: str) -> ModelTarget:
        """Parse one target from the last refresh, raising its precise error."""
        length, hashes, custom = self._raw[path]
        return parse_model_target(path, length, hashes, _as_dict(custom))


def targets_signers(metadata_dir: Path) -> tuple[str, ...]:
    """The keyids whose signatures on the trusted ``targets.json`` verify under the trusted
    ``root.json``: who vouched for the models it lists. Empty if there is no trusted metadata
    (yet) or it cannot be read; the caller reports that as an unknown signer."""
    try:
        root = Metadata[Root].from_bytes((metadata_dir / "root.json").read_bytes())
        targets = Metadata[Targets].from_bytes((metadata_dir / "targets.json").read_bytes())
        result = root.signed.get_verification_result(
            Targets.type, targets.signed_bytes, targets.signatures
        )
    except (OSError, ValueError, tuf_exceptions.RepositoryError):
        return ()
    return tuple(sorted(result.signed))


@dataclass(frozen=True)
class RootDirectorKeys:
    """The director keys (PEM) a verified root lists, and that root's version."""

    root_version: int
    keys: tuple[str, ...]


def trusted_root_director_keys(metadata_dir: Path) -> RootDirectorKeys | None:
    """The director keys of the newest root ngclient verified into ``metadata_dir``.

    ``None`` when there is no such root (yet, or for a moment while ngclient moves its
    ``root.json`` link) or it lists none. A root whose field is unusable raises
    :class:`RepositoryError`: it was signed by the root keys, so it is the fleet's own mistake,
    and the caller keeps the keys it had.
    """
    try:
        root = Metadata[Root].from_bytes((metadata_dir / "root.json").read_bytes()).signed
    except (OSError, ValueError, tuf_exceptions.RepositoryError):
        return None
    try:
        keys = director_keys_of(root)
    except InvalidKey as exc:
        raise RepositoryError(f"the trusted root's director keys are unusable: {exc}") from exc
    return None if keys is None else RootDirectorKeys(int(root.version), keys)


def _as_dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None
