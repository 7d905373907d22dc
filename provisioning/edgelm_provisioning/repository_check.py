"""The control plane's current targets metadata, verified against the fleet's root first.

``models push`` signs a new targets version over the one the control plane serves. The
server holds no offline key, but it could be broken or owned, so what it serves is verified
like a device verifies it, with python-tuf's ngclient (root rotation, timestamp, snapshot,
targets: signatures, thresholds, versions, expiry, lengths), starting from ``DIR/root.json``.

ngclient keeps what it verified in ``DIR/trusted-metadata/``, and that is what makes a
rollback visible: a server that serves an older timestamp, snapshot or targets version than
this machine saw at its last push (including the version it itself signed, which the push
re-reads once published) is refused with :class:`RepositoryRollback`, before anything is
signed. A freshly made fleet has nothing older than its first metadata, so nothing is lost
by starting that record at the first push.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig, Urllib3Fetcher

from edgelm_provisioning.errors import (
    ControlUnreachable,
    ProvisioningError,
    RepositoryExpired,
    RepositoryInvalid,
    RepositoryRollback,
    RepositorySignatureError,
)
from edgelm_provisioning.fleet_dir import FleetPaths
from edgelm_provisioning.operator_tls import FleetTrustFetcher, fleet_ssl_context


@dataclass(frozen=True)
class MetadataLimits:
    """Hard size limits on each role's metadata, in bytes: an endless answer stops here."""

    root_max_bytes: int = 512_000
    timestamp_max_bytes: int = 16_384
    snapshot_max_bytes: int = 2_000_000
    targets_max_bytes: int = 5_000_000
    socket_timeout_s: int = 30

    def updater_config(self) -> UpdaterConfig:
        return UpdaterConfig(
            root_max_length=self.root_max_bytes,
            timestamp_max_length=self.timestamp_max_bytes,
            snapshot_max_length=self.snapshot_max_bytes,
            targets_max_length=self.targets_max_bytes,
            app_user_agent="edgelm-fleet",
        )


@dataclass(frozen=True)
class VerifiedRepository:
    """Metadata that verified: the newest trusted root and the current targets."""

    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot_version: int
    timestamp_version: int


def metadata_url(control_url: str) -> str:
    return f"{control_url.rstrip('/')}/repository/metadata/"


def translate(exc: Exception, url: str) -> ProvisioningError:
    """The most specific error of ours for a python-tuf exception (subclasses first)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_exceptions.UnsignedMetadataError):
        return RepositorySignatureError(
            f"the repository's metadata is not signed by the fleet's keys: {text}"
        )
    if isinstance(exc, tuf_exceptions.BadVersionNumberError):
        return RepositoryRollback(
            f"the repository serves metadata older than this machine already verified: {text}"
        )
    if isinstance(exc, tuf_exceptions.ExpiredMetadataError):
        return RepositoryExpired(f"the repository's metadata has expired: {text}")
    if isinstance(exc, tuf_exceptions.DownloadLengthMismatchError):
        return RepositoryInvalid(f"the repository's metadata is over its size limit: {text}")
    if isinstance(exc, tuf_exceptions.DownloadHTTPError):
        return ControlUnreachable(
            f"cannot fetch the repository's metadata: HTTP {exc.status_code}",
            url=url,
            hint="is --control the fleet's control plane, and is it serving /repository/?",
        )
    if isinstance(exc, tuf_exceptions.DownloadError):
        return ControlUnreachable(
            f"cannot fetch the repository's metadata: {_deepest_cause(exc)}", url=url
        )
    return RepositoryInvalid(f"the repository's metadata is invalid: {text}")


def _deepest_cause(exc: BaseException) -> str:
    """The innermost cause's message: python-tuf reports a refused connection as a bare
    SlowRetrievalError, and "Connection refused" is what the operator needs to read."""
    text = str(exc) or type(exc).__name__
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if str(cause):
            text = str(cause)
        cause = cause.__cause__ or cause.__context__
    return text


def verify_repository(
    paths: FleetPaths,
    control_url: str,
    *,
    fetcher: FetcherInterface | None = None,
    limits: MetadataLimits | None = None,
) -> VerifiedRepository:
    """Fetch and verify the control plane's metadata from the fleet's root; raise if bad."""
    limits = limits or MetadataLimits()
    url = metadata_url(control_url)
    cache = paths.trusted_metadata_dir
    cache.mkdir(mode=0o700, exist_ok=True)
    try:
        updater = Updater(
            str(cache),
            url,
            fetcher=fetcher or _fetcher(paths, limits),
            config=limits.updater_config(),
            bootstrap=paths.root_json.read_bytes(),
        )
        updater.refresh()
    except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError, ValueError) as exc:
        raise translate(exc, url) from exc
    return _load_verified(cache)


def _fetcher(paths: FleetPaths, limits: MetadataLimits) -> FetcherInterface:
    """The fleet CA's trust when the fleet has one (as the devices do), else the system's."""
    context = fleet_ssl_context(paths.root)
    if context is None:
        return Urllib3Fetcher(socket_timeout=limits.socket_timeout_s)
    return FleetTrustFetcher(context, socket_timeout_s=limits.socket_timeout_s)


def _load_verified(cache: Path) -> VerifiedRepository:
    """What ngclient persisted: it writes a role's file only after that role verified."""
    root = Metadata[Root].from_file(str(cache / "root.json"))
    timestamp = Metadata[Timestamp].from_file(str(cache / "timestamp.json"))
    snapshot = Metadata[Snapshot].from_file(str(cache / "snapshot.json"))
    targets = Metadata[Targets].from_file(str(cache / "targets.json"))
    listed = snapshot.signed.meta["targets.json"].version
    if targets.signed.version != listed or timestamp.signed.snapshot_meta.version != (
        snapshot.signed.version
    ):  # a torn cache (another push at the same moment): never sign over it
        raise RepositoryInvalid(
            f"the verified metadata in {cache} is inconsistent (targets v{targets.signed.version}"
            f", snapshot lists v{listed}); run the command again"
        )
    return VerifiedRepository(root, targets, snapshot.signed.version, timestamp.signed.version)
