"""The fleet's TUF repository: accept pushed models, keep snapshot and timestamp fresh.

The repository lives in a folder (``repository_dir``: ``metadata/`` and ``targets/``), written
only here, with :class:`~edgelm_protocol.repository.RepositoryWriter`. The control plane holds
the online snapshot and timestamp keys, never the targets or root key: it verifies what the
operator signed (:mod:`.push`) and re-signs only snapshot and timestamp around it.

A push, step by step (under one lock, so pushes and refreshes never interleave):

1. re-read the metadata from disk (another replica sharing the folder may have written it);
2. check the signed targets and the blobs (:func:`.push.plan_push`, :func:`.push.match_blobs`);
3. hard-link each blob to its consistent-snapshot name under ``targets/`` and fsync;
4. in one store transaction: claim the new targets version (compare-and-set, so two
   replicas cannot both publish a version N + 1), index the targets, and write targets,
   snapshot and timestamp metadata (the timestamp is what clients read first: it is the
   commit point on disk);
5. announce the new timestamp version on MQTT, retained.

A failure before step 4 publishes nothing; blobs placed by a failed push are harmless (no
metadata names them) and a retried push reuses them.

A key rotation (:meth:`RepositoryService.accept_root`) goes the same way under the same lock:
the pushed root is checked (:func:`.rotation.plan_root`), re-signed targets with it claim
their version in the store like a push, and the files are written targets, snapshot,
``N+1.root.json``, timestamp. Then the new timestamp is announced (devices refresh and walk
to the new root) and the root hooks run: the director re-signs every current desired state
with the key the new root names. A control plane killed between the root file and the
timestamp repairs the repository when it starts (:meth:`RepositoryService.sync_index`); a
rotation that raises part-way in a running server (a timestamp that cannot be written, a
store commit that fails after the files) is repaired the same way at once, before the error
goes back to the caller, and if the new root stands after that, it is announced and the hooks
run, as for a rotation that went through.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from tuf.api.metadata import Metadata, Root, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from edgelm_control.clock import Clock
from edgelm_control.errors import ConfigError, Conflict
from edgelm_control.repository.director_keys import DirectorKeyring
from edgelm_control.repository.push import (
    Blob,
    ReceivedBlob,
    match_blobs,
    member_blobs,
    plan_push,
    target_blob,
)
from edgelm_control.repository.rotation import ONLINE_ROLES, HeldKeys, RootPlan, plan_root
from edgelm_control.repository.uploads import Upload
from edgelm_control.store import Store
from edgelm_control.store.models import (
    claim_targets_version,
    record_timestamp_version,
    replace_targets,
    repository_versions,
)
from edgelm_protocol import ProtocolError
from edgelm_protocol.repository import RepositoryWriter, fsync_dir
from edgelm_protocol.targets import ModelTarget, parse_model_target

log = structlog.get_logger(__name__)

Announcer = Callable[[int], Awaitable[None]]
RootHook = Callable[[], Awaitable[Any]]


class RepositoryService:
    """The repository folder, the model index in the store, and announcements."""

    def __init__(
        self,
        repository_dir: Path,
        keys_dir: Path,
        store: Store,
        clock: Clock,
        announce: Announcer,
        *,
        director_keys: DirectorKeyring | None = None,
    ) -> None:
        self.repository_dir = repository_dir
        self.keys_dir = keys_dir
        self.metadata_dir = repository_dir / "metadata"
        self.targets_dir = repository_dir / "targets"
        self.incoming_dir = repository_dir / ".incoming"
        self._store = store
        self._clock = clock
        self._announce = announce
        self._director_keys = director_keys
        self._root_hooks: list[tuple[str, RootHook]] = []
        self._lock = asyncio.Lock()

    def when_root_published(self, name: str, hook: RootHook) -> None:
        """Run ``hook`` after each new root is published and announced (a failure is logged)."""
        self._root_hooks.append((name, hook))

    def _open(self) -> RepositoryWriter:
        try:
            return RepositoryWriter.open(self.repository_dir, self.keys_dir)
        except (OSError, ValueError, KeyError, DeserializationError) as exc:
            raise ConfigError(
                f"the TUF repository in {self.repository_dir} cannot be read ({exc}); "
                "edgelm provision fleet-init creates it, with the keys in "
                f"{self.keys_dir}"
            ) from exc

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock.now_ms() / 1000, datetime.UTC)

    async def timestamp_version(self) -> int:
        writer = await asyncio.to_thread(self._open)
        return int(writer.md[Timestamp.type].signed.version)

    async def sync_index(self) -> int:
        """Rebuild the model index from the metadata on disk; return the targets version."""
        async with self._lock:
            return await self._resync()

    async def _resync(self) -> int:
        """Under the lock: finish a rotation cut short on disk, then make the model index and
        the recorded versions match the metadata on disk; return the targets version."""
        writer = await asyncio.to_thread(self._open)
        await asyncio.to_thread(self._finish_interrupted_rotation, writer)
        targets = writer.md[Targets.type].signed
        models = _models_of(targets)
        async with self._store.write() as conn:
            recorded = await repository_versions(conn)
            await replace_targets(
                conn, models, targets_version=targets.version, now_ms=self._clock.now_ms()
            )
            timestamp = int(writer.md[Timestamp.type].signed.version)
            if recorded is None or recorded.targets_version != targets.version:
                await claim_targets_version(
                    conn,
                    expected=None if recorded is None else recorded.targets_version,
                    targets_version=targets.version,
                    timestamp_version=timestamp,
                    now_ms=self._clock.now_ms(),
                )
            await record_timestamp_version(conn, timestamp, self._clock.now_ms())
        log.info("repository_indexed", targets_version=targets.version, models=len(models))
        return int(targets.version)

    async def precheck(self, targets: bytes) -> None:
        """Refuse pushed targets early (signature, version, schema), before the blobs come.

        :meth:`accept_push` checks everything again under the lock: this is only a fast path.
        """
        writer = await asyncio.to_thread(self._open)
        plan_push(writer.md[Root.type], writer.md[Targets.type], targets, now=self._now())

    async def accept_push(self, upload: Upload) -> tuple[ModelTarget, ...]:
        """Verify and publish a pushed model (see the module docstring); the added targets."""
        async with self._lock:
            writer = await asyncio.to_thread(self._open)
            current = writer.md[Targets.type]
            plan = plan_push(writer.md[Root.type], current, upload.targets, now=self._now())
            required = list(plan.blobs)
            for model in plan.added:
                if model.is_bundle:
                    manifest = await asyncio.to_thread(self._manifest, model, upload)
                    required.extend(member_blobs(model, manifest))
            present = await asyncio.to_thread(self._present, required)
            pairs = match_blobs(required, upload.blobs, present=present)
            await asyncio.to_thread(self._place, pairs, upload)
            now_ms = self._clock.now_ms()
            new_version = int(plan.metadata.signed.version)
            async with self._store.write() as conn:
                recorded = await repository_versions(conn)
                expected = None if recorded is None else recorded.targets_version
                if expected is not None and expected != current.signed.version:
                    raise Conflict(
                        f"the model index is at targets version {expected} but the repository "
                        f"at {current.signed.version}; retry the push",
                        param="targets",
                    )
                claimed = await claim_targets_version(
                    conn,
                    expected=expected,
                    targets_version=new_version,
                    timestamp_version=int(writer.md[Timestamp.type].signed.version) + 1,
                    now_ms=now_ms,
                )
                if not claimed:
                    raise Conflict(
                        f"another push published targets version {new_version} first",
                        param="targets",
                    )
                await replace_targets(conn, plan.models, targets_version=new_version, now_ms=now_ms)
                await asyncio.to_thread(writer.accept_targets, plan.metadata)
            timestamp_version = int(writer.md[Timestamp.type].signed.version)
        log.info(
            "models_pushed",
            targets_version=new_version,
            timestamp_version=timestamp_version,
            added=[m.ref for m in plan.added],
        )
        await self._announce(timestamp_version)
        return plan.added

    async def accept_root(self, raw_root: bytes, raw_targets: bytes | None) -> tuple[RootPlan, int]:
        """Verify and publish root version N + 1 (a key rotation; see the module docstring),
        with re-signed targets when the targets key changed; announce it; run the hooks.
        Return the plan published and the new timestamp version."""
        async with self._lock:
            writer = await asyncio.to_thread(self._open)
            director = self._director_keys
            if director is not None:
                await asyncio.to_thread(director.reload)  # the operator may have copied one in
            held = HeldKeys(
                online={r: [s.public_key.keyid for s in writer.held[r]] for r in ONLINE_ROLES},
                director=director.held if director is not None else (),
            )
            current = writer.md[Targets.type]
            plan = plan_root(
                writer.md[Root.type], current, raw_root, raw_targets, held=held, now=self._now()
            )
            failure: Exception | None = None
            try:
                await self._write_root(writer, plan, int(current.signed.version))
            except Exception as exc:
                # Files may stop part-way (N+1.root.json without its timestamp), or the store
                # may lag the files (a commit that failed after them): either leaves devices
                # unable to verify, or every push conflicting, until a restart. Repair now.
                repaired = await self._repair_rotation(plan.version)
                if repaired is None:
                    raise
                log.error(
                    "root_rotation_repaired",
                    root_version=plan.version,
                    timestamp_version=repaired,
                    error=f"{type(exc).__name__}: {exc}"[:500],
                )
                failure = exc
                timestamp_version = repaired
            else:
                timestamp_version = int(writer.md[Timestamp.type].signed.version)
                log.info(
                    "root_published",
                    root_version=plan.version,
                    targets_version=int(writer.md[Targets.type].signed.version),
                    timestamp_version=timestamp_version,
                    targets_resigned=plan.targets is not None,
                    director_keys=None if plan.director_keys is None else len(plan.director_keys),
                )
        # The root stands (the director may sign with its key already): tell the devices, and
        # re-sign, even when the request that published it ends in an error.
        await self._announce(timestamp_version)
        for name, hook in self._root_hooks:
            try:
                await hook()
            except Exception:  # published is published: the hook's own retries take over
                log.exception("root_hook_failed", hook=name, root_version=plan.version)
        if failure is not None:
            raise failure
        return plan, timestamp_version

    async def _write_root(self, writer: RepositoryWriter, plan: RootPlan, current: int) -> None:
        """Under the lock: publish ``plan`` (files, and the store with re-signed targets)."""
        now_ms = self._clock.now_ms()
        resigned = plan.targets
        if resigned is None:
            await asyncio.to_thread(writer.accept_root, plan.root)
            version = int(writer.md[Timestamp.type].signed.version)
            async with self._store.write() as conn:
                await record_timestamp_version(conn, version, now_ms)
            return
        async with self._store.write() as conn:
            await self._claim(
                conn,
                current=current,
                new=int(resigned.metadata.signed.version),
                timestamp=int(writer.md[Timestamp.type].signed.version) + 1,
                now_ms=now_ms,
            )
            await replace_targets(
                conn,
                resigned.models,
                targets_version=int(resigned.metadata.signed.version),
                now_ms=now_ms,
            )
            await asyncio.to_thread(writer.accept_root, plan.root, resigned.metadata)

    async def _repair_rotation(self, root_version: int) -> int | None:
        """Under the lock, after publishing root ``root_version`` raised: repair files and
        index as a start does. The timestamp version if that root now stands on disk with
        targets it verifies, else ``None`` (nothing was published, or it is left for the
        next start to finish)."""
        try:
            await self._resync()
        except Exception:  # the files may be right even if the store is not: look at them
            log.exception("repository_repair_failed", root_version=root_version)
        try:
            writer = await asyncio.to_thread(self._open)
        except ConfigError:
            log.exception("repository_repair_failed", root_version=root_version)
            return None
        root = writer.md[Root.type]
        if root.signed.version != root_version or not _verifies(root, writer.md[Targets.type]):
            return None
        return int(writer.md[Timestamp.type].signed.version)

    async def _claim(
        self, conn: Any, *, current: int, new: int, timestamp: int, now_ms: int
    ) -> None:
        """Claim targets version ``new`` in the store (compare-and-set against ``current``)."""
        recorded = await repository_versions(conn)
        expected = None if recorded is None else recorded.targets_version
        if expected is not None and expected != current:
            raise Conflict(
                f"the model index is at targets version {expected} but the repository at "
                f"{current}; retry",
                param="targets",
            )
        claimed = await claim_targets_version(
            conn, expected=expected, targets_version=new, timestamp_version=timestamp,
            now_ms=now_ms,
        )  # fmt: skip
        if not claimed:
            raise Conflict(f"another push published targets version {new} first", param="targets")

    async def refresh(self, *, before_s: int) -> int | None:
        """Re-sign snapshot and timestamp if either expires within ``before_s``; the new
        timestamp version, or None if nothing was due."""
        async with self._lock:
            writer = await asyncio.to_thread(self._open)
            horizon = self._now() + datetime.timedelta(seconds=before_s)
            snapshot_due = writer.md["snapshot"].signed.expires <= horizon
            timestamp_due = writer.md[Timestamp.type].signed.expires <= horizon
            if not (snapshot_due or timestamp_due):
                return None
            if snapshot_due:
                await asyncio.to_thread(writer.publish, ())
            else:
                await asyncio.to_thread(writer.refresh_timestamp)
            version = int(writer.md[Timestamp.type].signed.version)
            async with self._store.write() as conn:
                await record_timestamp_version(conn, version, self._clock.now_ms())
        log.info("repository_refreshed", timestamp_version=version, snapshot=snapshot_due)
        await self._announce(version)
        return version

    # --- file work, in a worker thread -------------------------------------------------------

    def _finish_interrupted_rotation(self, writer: RepositoryWriter) -> None:
        """A rotation killed after ``N+1.root.json`` and before the timestamp left a root
        whose targets keys did not sign the published targets, and the re-signed targets
        (written first) beside them: publish those, as the rotation would have."""
        root, current = writer.md[Root.type], writer.md[Targets.type]
        if _verifies(root, current):
            return
        following = self.metadata_dir / f"{current.signed.version + 1}.targets.json"
        if not following.is_file():
            log.error("repository_targets_unverifiable", root_version=root.signed.version,
                      targets_version=current.signed.version)  # fmt: skip
            return
        resigned = Metadata[Targets].from_file(str(following))
        if not _verifies(root, resigned):
            log.error("repository_targets_unverifiable", root_version=root.signed.version,
                      targets_version=resigned.signed.version)  # fmt: skip
            return
        writer.md[Targets.type] = resigned
        writer.publish(roles=())
        log.warning("root_rotation_finished", root_version=root.signed.version,
                    targets_version=resigned.signed.version)  # fmt: skip

    def _manifest(self, model: ModelTarget, upload: Upload) -> bytes:
        blob = target_blob(model)
        received = upload.blobs.get(model.sha256)
        if received is not None and received.length == model.length:
            return upload.files[model.sha256].read_bytes()
        placed = self.targets_dir / blob.placement
        if placed.is_file():
            return placed.read_bytes()
        return b""  # match_blobs reports the missing (or mismatched) manifest precisely

    def _present(self, required: list[Blob]) -> set[str]:
        return {b.placement for b in required if (self.targets_dir / b.placement).is_file()}

    def _place(self, pairs: list[tuple[Blob, ReceivedBlob | None]], upload: Upload) -> None:
        touched: set[Path] = set()
        for blob, received in pairs:
            if received is None:
                continue
            dest = self.targets_dir / blob.placement
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                continue
            source = upload.files[received.sha256]
            try:
                os.link(source, dest)
            except FileExistsError:
                continue
            except OSError:  # another file system: copy, atomically
                tmp = dest.with_name(f".{dest.name}.tmp")
                with open(source, "rb") as src, open(tmp, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
            touched.add(dest.parent)
        for directory in touched:
            fsync_dir(directory)


def _models_of(targets: Targets) -> list[ModelTarget]:
    models = []
    for path, info in sorted(targets.targets.items()):
        custom = info.unrecognized_fields.get("custom")
        try:
            models.append(
                parse_model_target(
                    path,
                    info.length,
                    dict(info.hashes),
                    custom if isinstance(custom, dict) else None,
                )
            )
        except ProtocolError as exc:
            log.warning("repository_target_skipped", path=path, error=str(exc))
    return models


def _verifies(root: Metadata[Root], targets: Metadata[Targets]) -> bool:
    return root.signed.get_verification_result(
        Targets.type, targets.signed_bytes, targets.signatures
    ).verified
