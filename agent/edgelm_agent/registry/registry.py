"""The model registry: every model on the device arrives, is kept and is checked through here.

Layout under ``<state_dir>/registry``::

    trust/root.json          the trust anchor: the root metadata this device starts from
    metadata/                ngclient's verified metadata
    local-repo/, local-keys/ standalone devices only: the device's own signed repository
    blobs/ bundles/ staging/ the content-addressed store (see blob_store.py)
    state.json               installed models, active, previous, pinned, history
    clock.json               the last-known-good time
    lock                     held by whoever is changing the registry (the running agent)

Every path in goes through :meth:`Registry.install`, which takes a target from verified TUF
metadata and a blob whose length and sha256 match it. :meth:`Registry.import_model` is how a
standalone device adds a file: it signs the file into the local repository first, then installs
it by the same path. Expired metadata stops installs, never the active model, whose verified
target is kept in ``state.json`` and re-checked against its blob before each load.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgelm_agent.inference.types import MAX_CONTEXT_LENGTH, MIN_CONTEXT_LENGTH
from edgelm_agent.registry.blob_store import BlobStore, hash_stream
from edgelm_agent.registry.bundle import BundleFile, build_manifest, parse_manifest
from edgelm_agent.registry.clock import LastKnownGoodClock
from edgelm_agent.registry.errors import (
    Cancelled,
    InvalidModelMetadata,
    ModelNotInstalled,
    RegistryBusy,
    RegistryError,
    TargetMismatch,
    VersionConflict,
)
from edgelm_agent.registry.import_source import ImportSource
from edgelm_agent.registry.mirrors import download_resumable, subfolder
from edgelm_agent.registry.model_target import (
    BACKEND_FOR_FORMAT,
    BUNDLE_FILE,
    GENERATION,
    NAME_RE,
    ModelTarget,
    check_name,
    check_presets,
    check_role,
    check_version,
    target_path,
)
from edgelm_agent.registry.state import RegistryState, StateFile
from edgelm_agent.registry.trust import TrustClient, targets_signers
from edgelm_protocol.presets import presets_custom
from edgelm_protocol.repository.atomic_file import write_atomic
from edgelm_protocol.repository.writer import RepositoryWriter

Progress = Callable[[str, int, int], None]  # (phase, bytes done, bytes total)
GGUF_MAGIC = b"GGUF"


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class RegistryConfig:
    root: Path
    #: Mirrors of the fleet's repository, tried in order; empty for a standalone device.
    mirrors: tuple[str, ...] = ()
    #: The fleet repository's root metadata, installed as trust anchor on first use.
    trust_root: Path | None = None
    free_margin_bytes: int = 256 << 20


@dataclass(frozen=True)
class TrustChange:
    """What enrolling in a fleet did to the registry."""

    old_root: bytes | None
    kept: list[str]
    dropped: list[str]
    repository_reachable: bool


@dataclass(frozen=True)
class VerifyResult:
    ref: str
    ok: bool
    error: str | None = None


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order versions naturally: numbers as numbers (1.10 after 1.9), words as words."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.+_-]", version)
    )


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _offered_names(targets_json: Path) -> set[str]:
    """Model names, and ``name@version``, listed in targets metadata ngclient verified
    before it stored it."""
    try:
        targets = json.loads(targets_json.read_bytes())["signed"]["targets"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    names = set()
    for path in targets if isinstance(targets, dict) else ():
        parts = path.split("/") if isinstance(path, str) else []
        if len(parts) == 4 and parts[0] == "models" and NAME_RE.fullmatch(parts[1]):
            names.add(parts[1])
            names.add(f"{parts[1]}@{parts[2]}")
    return names


def default_version(sha256: str, presets: dict[str, Any] | None) -> str:
    """The version of an import that names none: the content's digest, and the presets' too,
    so the same file imported with other presets is another version, not a conflict."""
    if not presets:
        return f"sha256-{sha256[:12]}"
    text = json.dumps(presets, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"sha256-{sha256[:12]}-p{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def name_from_filename(path: Path) -> str:
    """A valid model name from a file or folder name: ``SmolLM2-135M.gguf`` → ``smollm2-135m``."""
    stem = path.name.removesuffix(".gguf").lower()
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("-._") or "model"
    return check_name(cleaned[:64])


class Registry:
    def __init__(
        self, config: RegistryConfig, crash_point: Callable[[str], None] = lambda point: None
    ) -> None:
        self.config = config
        self._crash_point = crash_point  # fault injection for the kill -9 tests
        root = config.root
        root.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(root, free_margin_bytes=config.free_margin_bytes)
        self.state_file = StateFile(root / "state.json")
        self.clock = LastKnownGoodClock(root / "clock.json")
        self._anchor_path = root / "trust" / "root.json"
        self._local_repo_dir = root / "local-repo"
        self._local_keys_dir = root / "local-keys"
        self._names_cache: tuple[tuple[tuple[int, int] | None, ...], frozenset[str]] | None = None
        self._state_lock = threading.RLock()
        #: Blobs of installs in progress, by model: gc leaves them alone.
        self._installing: dict[str, set[str]] = {}

    # --- exclusive access ----------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the registry lock, or raise RegistryBusy if a running agent holds it."""
        fd = os.open(self.config.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise RegistryBusy(
                    f"the registry in {self.config.root} is in use by a running agent; "
                    "talk to it with --socket instead"
                ) from exc
            yield
        finally:
            os.close(fd)

    # --- trust ---------------------------------------------------------------------------------

    @property
    def standalone(self) -> bool:
        return not self.config.mirrors

    def _mirrors(self) -> list[str]:
        return list(self.config.mirrors) if self.config.mirrors else [str(self._local_repo_dir)]

    def _anchor(self) -> bytes:
        if self._anchor_path.exists():
            return self._anchor_path.read_bytes()
        if self.standalone:
            writer = self._local_writer()
            anchor = writer.root_bytes()
        elif self.config.trust_root is not None:
            anchor = self.config.trust_root.read_bytes()
        else:
            raise RegistryError("no trust root: set repository_root to the fleet's root.json")
        write_atomic(self._anchor_path, anchor)
        return anchor

    def _local_writer(self) -> RepositoryWriter:
        if (self._local_repo_dir / "metadata" / "timestamp.json").exists():
            return RepositoryWriter.open(self._local_repo_dir, self._local_keys_dir)
        self._local_keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return RepositoryWriter.create(self._local_repo_dir, self._local_keys_dir)

    def trust(self) -> TrustClient:
        return TrustClient(
            self.config.root / "metadata", self._anchor(), self._mirrors(), self.clock
        )

    def targets_signers(self) -> tuple[str, ...]:
        """Keyids of the TUF targets keys that signed the trusted metadata listing the models."""
        return targets_signers(self.config.root / "metadata")

    def adopt_trust_root(self, root_bytes: bytes) -> TrustChange:
        """Trust ``root_bytes`` (a fleet's root, at enrollment) instead of the current anchor.

        Metadata verified under the old root is forgotten. Installed models are kept only if
        metadata verified under the new root lists them with the same length and hash; when
        the new repository cannot be reached, none can be checked and none is kept.
        """
        with self._state_lock:
            old = self._anchor_path.read_bytes() if self._anchor_path.exists() else None
            write_atomic(self._anchor_path, root_bytes)
            shutil.rmtree(self.config.root / "metadata", ignore_errors=True)
            try:
                listed = {(t.path, t.length, t.sha256) for t in self.trust().refresh().values()}
                reachable = True
            except RegistryError:
                listed, reachable = set(), False
            before = self.state()
            dropped = {
                ref
                for ref, t in before.models.items()
                if (t.path, t.length, t.sha256) not in listed
            }
            after = before.removed(dropped)
            after = replace(
                after,
                active=None if after.active in dropped else after.active,
                previous=None if after.previous in dropped else after.previous,
                pinned=after.pinned - dropped,
            )
            self.save(after)
        return TrustChange(
            old_root=old,
            kept=sorted(set(before.models) - dropped),
            dropped=sorted(dropped),
            repository_reachable=reachable,
        )

    def available(self) -> dict[str, ModelTarget]:
        """Every model the trusted repository offers, after a metadata refresh."""
        return {t.ref: t for t in self.trust().refresh().values()}

    def known_names(self) -> set[str]:
        """Names of the models this device has or can get: installed ones, and those the
        trusted repository offered at its last refresh. No network: it reads the verified
        metadata ngclient keeps on disk (and caches the answer until a file changes), so a
        job submission can ask it on every request, offline."""
        files = (self.state_file.path, self.config.root / "metadata" / "targets.json")
        key = tuple(_stamp(f) for f in files)
        if self._names_cache is not None and self._names_cache[0] == key:
            return set(self._names_cache[1])
        installed = self.state().models.values()
        names = {t.name for t in installed} | {f"{t.name}@{t.version}" for t in installed}
        names |= _offered_names(files[1])
        self._names_cache = (key, frozenset(names))
        return names

    # --- state ---------------------------------------------------------------------------------

    def state(self) -> RegistryState:
        return self.state_file.load()

    def save(self, state: RegistryState) -> None:
        self.state_file.save(state)

    def update(self, change: Callable[[RegistryState], RegistryState]) -> RegistryState:
        """Read, change and write ``state.json`` as one step: installs (which run without the
        activation lock) and activations never overwrite each other's change."""
        with self._state_lock:
            state = change(self.state())
            self.save(state)
            return state

    # --- installing ----------------------------------------------------------------------------

    def install(
        self,
        name: str,
        version: str | None = None,
        progress: Progress = _no_progress,
        cancel: threading.Event | None = None,
    ) -> ModelTarget:
        """Fetch, verify and record a model from the trusted repository (newest if no version);
        ``cancel`` stops a download, keeping its partial file to resume."""
        trust = self.trust()
        offered = trust.refresh()
        candidates = [
            path
            for path in trust.paths()
            if path.startswith(f"models/{check_name(name)}/")
            and (version is None or path.split("/")[2] == version)
        ]
        if not candidates:
            raise ModelNotInstalled(
                f"the repository has no model {name}{'@' + version if version else ''}"
            )
        if version is None:  # the newest signed version: 10.0 after 9.0, not before
            candidates.sort(key=lambda p: version_key(p.split("/")[2]))
        path = candidates[-1]
        target = offered.get(path) or trust.target(path)  # the latter raises the precise error
        return self._install(target, progress, cancel, None)

    def install_target(
        self,
        path: str,
        *,
        length: int,
        sha256: str,
        progress: Progress = _no_progress,
        cancel: threading.Event | None = None,
        details: dict[str, Any] | None = None,
    ) -> ModelTarget:
        """Install exactly the target a desired state names: ``path`` with this length and
        sha256, and only if freshly verified TUF metadata lists it so.

        A target already installed whose blobs are present is not fetched again. A download
        resumes from its partial file and can be cancelled (``cancel``), which keeps the
        partial file for the next attempt. Nothing here takes the activation lock: a
        rollback never waits behind a download.
        """
        trust = self.trust()
        offered = trust.refresh()
        if path not in trust.paths():
            raise TargetMismatch(f"the trusted repository does not list {path}")
        target = offered.get(path) or trust.target(path)  # the latter raises the precise error
        if (target.length, target.sha256) != (length, sha256):
            raise TargetMismatch(
                f"{path}: signed metadata says {target.length} bytes, sha256 "
                f"{target.sha256[:16]}…; the desired state says {length} bytes, sha256 "
                f"{sha256[:16]}…"
            )
        return self._install(target, progress, cancel, details)

    def _install(
        self,
        target: ModelTarget,
        progress: Progress,
        cancel: threading.Event | None,
        details: dict[str, Any] | None,
    ) -> ModelTarget:
        with self._downloading(target):
            self._fetch(target, progress, cancel)
            self._crash_point("install.before_commit")
            if self.state().models.get(target.ref) != target:
                self.update(lambda state: state.installed(target, details))
        return target

    @contextmanager
    def _downloading(self, target: ModelTarget) -> Iterator[None]:
        """Mark the target's blobs as in use while it installs, so a gc that runs meanwhile
        (it does not wait for downloads) never removes a blob just committed."""
        with self._state_lock:
            self._installing[target.ref] = {target.sha256}
        try:
            yield
        finally:
            with self._state_lock:
                self._installing.pop(target.ref, None)

    def _fetch(
        self, target: ModelTarget, progress: Progress, cancel: threading.Event | None = None
    ) -> None:
        directory = target.path.rsplit("/", 1)[0]
        self._fetch_blob(
            f"{directory}/{target.sha256}.{target.path.rsplit('/', 1)[1]}",
            target.sha256,
            target.length,
            progress,
            cancel,
        )
        if target.is_bundle:
            members = self._bundle_members(target)
            with self._state_lock:
                self._installing[target.ref] = {target.sha256, *(m.sha256 for m in members)}
            total = sum(m.length for m in members)
            done = 0
            for member in members:
                base = done

                def on_member(phase: str, d: int, t: int, base: int = base) -> None:
                    progress(phase, base + d, total)

                self._fetch_blob(
                    f"{directory}/files/{member.sha256}",
                    member.sha256,
                    member.length,
                    on_member,
                    cancel,
                )
                done += member.length

    def _fetch_blob(
        self,
        relative: str,
        sha256: str,
        length: int,
        progress: Progress,
        cancel: threading.Event | None = None,
    ) -> None:
        if self.blobs.has(sha256, length):
            return
        self.blobs.ensure_space(length)
        partial = self.blobs.staging / f"{sha256}.partial"
        fetched = 0

        def on_bytes(n: int) -> None:
            nonlocal fetched
            fetched += n
            progress("download", fetched, length)

        download_resumable(
            [subfolder(m, "targets") for m in self._mirrors()],
            relative,
            partial,
            length,
            progress=on_bytes,
            cancel=cancel,
        )
        self._crash_point("download.complete")
        try:
            self.blobs.commit(partial, sha256, length)
        finally:
            partial.unlink(missing_ok=True)

    @staticmethod
    def _hash_member(
        tree: ImportSource,
        member: str,
        progress: Callable[[int], None],
        cancel: threading.Event | None,
    ) -> tuple[str, int]:
        with tree.open(member) as f:
            return hash_stream(f, progress, cancel)

    def _bundle_members(self, target: ModelTarget) -> list[BundleFile]:
        manifest = self.blobs.blob_path(target.sha256).read_bytes()
        return parse_manifest(manifest)

    # --- standalone import ---------------------------------------------------------------------

    def import_model(
        self,
        source: Path,
        *,
        name: str | None = None,
        version: str | None = None,
        context_length: int = 4096,
        quantization: str = "unknown",
        progress: Progress = _no_progress,
        cancel: threading.Event | None = None,
        role: str = GENERATION,
        presets: dict[str, Any] | None = None,
    ) -> ModelTarget:
        """Sign a local GGUF file or ONNX folder into this device's repository, then install it.

        ``presets`` (the signed form, see edgelm_protocol.presets) are checked as the API will
        use them before anything is read, and signed with the model: a version holds one set
        of presets for ever, and without ``version`` the default one names both.

        The source is scanned once and read only through what the scan opened (see
        import_source.py). Its size is checked against the free disk right after the scan;
        everything is hashed before anything is copied, so a refused import (a version that
        exists with other content) leaves nothing behind in the blob store. ``cancel`` stops
        hashing and copying between chunks.
        """
        if not self.standalone:
            raise RegistryError(
                "this device trusts a fleet repository; publish models there instead of importing"
            )
        if not MIN_CONTEXT_LENGTH <= context_length <= MAX_CONTEXT_LENGTH:
            raise InvalidModelMetadata(
                f"context length must be at least {MIN_CONTEXT_LENGTH} tokens (to hold a "
                f"health check and a chat) and at most {MAX_CONTEXT_LENGTH}, got {context_length}"
            )
        name = check_name(name) if name else name_from_filename(source)
        version = check_version(version) if version else None
        role = check_role(role)
        signed_presets = (
            presets_custom(check_presets(presets, context_length=context_length))
            if presets
            else None
        )
        with ImportSource.scan(source) as tree:
            self._crash_point("import.scanned")
            version = self._sign_import(
                tree,
                name,
                version,
                context_length,
                quantization,
                progress,
                cancel,
                role,
                presets=signed_presets,
            )
        return self.install(name, version, progress)

    def _sign_import(
        self,
        tree: ImportSource,
        name: str,
        version: str | None,
        context_length: int,
        quantization: str,
        progress: Progress,
        cancel: threading.Event | None,
        role: str = GENERATION,
        *,
        presets: dict[str, Any] | None = None,
    ) -> str:
        """Hash, check, store and sign the scanned source; return the version signed."""
        source = tree.root
        fmt = "onnx" if tree.is_folder else "gguf"
        if role != GENERATION and fmt != "gguf":
            raise InvalidModelMetadata(
                f"{source} is an ONNX folder; an {role} model must be a GGUF file (served by "
                "llama.cpp)"
            )
        if fmt == "gguf":
            with tree.open(tree.members[0]) as f:
                if f.read(4) != GGUF_MAGIC:
                    raise InvalidModelMetadata(f"{source} is not a GGUF file")
        elif "genai_config.json" not in tree.members:
            raise InvalidModelMetadata(f"{source} is a folder without genai_config.json")
        total = tree.total_size
        # Before hashing: an import that cannot fit is refused now, not after reading it
        # all. Content of a size already stored (the same --model at every boot) is likely
        # stored already and not counted; the exact check comes before each copy.
        stored = self.blobs.stored_sizes()
        self.blobs.ensure_space(
            sum(tree.size(m) for m in tree.members if tree.size(m) not in stored)
        )
        done = 0

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            progress("import", done, 2 * total)  # hashing, then copying

        hashed = {m: self._hash_member(tree, m, on_bytes, cancel) for m in tree.members}
        manifest = None
        members: list[BundleFile] = []
        if fmt == "gguf":
            sha256 = hashed[tree.members[0]][0]
            filename = "model.gguf"
        else:
            members = [BundleFile(m, hashed[m][1], hashed[m][0]) for m in tree.members]
            manifest = build_manifest(members)
            sha256 = hashlib.sha256(manifest).hexdigest()
            filename = BUNDLE_FILE
        version = version or default_version(sha256, presets)
        signed_path = target_path(name, version, filename)
        writer = self._local_writer()
        same_version = [
            (path, info)
            for path, info in writer.targets().items()
            if path.startswith(f"models/{name}/{version}/")
        ]
        existing = next((info for path, info in same_version if path == signed_path), None)
        if any(
            path != signed_path or info.hashes.get("sha256") != sha256
            for path, info in same_version
        ):
            raise VersionConflict(
                f"{name}@{version} already exists with other content; "
                "versions never change, so import under a new version"
            )
        signed = existing.unrecognized_fields.get("custom", {}) if existing is not None else {}
        signed_role = signed.get("edgelm", {}).get("role", GENERATION) if signed else role
        if signed_role != role:
            raise VersionConflict(
                f"{name}@{version} is already imported with role {signed_role}; versions "
                f"never change, so import it with role {role} under a new --version"
            )
        if existing is not None and (signed.get("edgelm", {}).get("presets") or None) != presets:
            raise VersionConflict(
                f"{name}@{version} is already imported with other presets; presets are signed "
                "with the model and versions never change, so import under a new --version"
            )
        for relative in tree.members:
            self.blobs.import_stream(
                functools.partial(tree.open, relative),
                str(tree.shown(relative)),
                hashed[relative],
                on_bytes,
                cancel,
            )
        if manifest is not None:
            self.blobs.import_bytes(manifest)
        blob = self.blobs.blob_path(sha256)
        custom = {
            "edgelm": {
                "name": name,
                "version": version,
                "format": fmt,
                "backend": BACKEND_FOR_FORMAT[fmt],
                "context_length": context_length,
                "chat_template": None,
                "quantization": quantization,
                "min_ram_bytes": int(total * 1.2),
                "sampling": {},
                "health_check": {},
            }
        }
        if role != GENERATION:  # absent means generation, as in metadata signed before roles
            custom["edgelm"]["role"] = role
        if presets:
            custom["edgelm"]["presets"] = presets
        if existing is None:
            for member in members:
                writer.place_file(
                    f"models/{name}/{version}/files/{member.sha256}",
                    self.blobs.blob_path(member.sha256),
                )
            self._crash_point("import.blob_stored")
            writer.add_target(signed_path, blob, custom)
            writer.publish()
            self._crash_point("import.published")
        return version

    # --- using installed models ----------------------------------------------------------------

    def find(self, ref: str) -> ModelTarget:
        """An installed model by ``name@version``, or ``name`` for its only/newest version."""
        models = self.state().models
        if ref in models:
            return models[ref]
        named = sorted(
            (t for t in models.values() if t.name == ref), key=lambda t: version_key(t.version)
        )
        if not named:
            raise ModelNotInstalled(
                f"model {ref} is not installed; installed: {', '.join(sorted(models)) or 'none'}"
            )
        return named[-1]

    def verified_path(
        self,
        target: ModelTarget,
        progress: Progress = _no_progress,
        cancel: threading.Event | None = None,
    ) -> Path:
        """Re-hash the model's blobs against its signed target; return the path to load.
        ``cancel`` stops the hashing between chunks."""
        self.blobs.verify(
            target.sha256, target.length, lambda n: progress("verify", n, target.length), cancel
        )
        if not target.is_bundle:
            return self.blobs.blob_path(target.sha256)
        members = self._bundle_members(target)
        for member in members:
            self.blobs.verify(member.sha256, member.length, cancel=cancel)
        folder = self.blobs.materialize_bundle(target.sha256, members)
        for member in members:  # the folder's links must still point at the verified blobs
            if (folder / member.path).stat().st_ino != self.blobs.blob_path(
                member.sha256
            ).stat().st_ino:
                raise TargetMismatch(f"bundle folder {folder} does not match its blobs")
        return folder

    def verify(
        self,
        ref: str | None = None,
        progress: Progress = _no_progress,
        cancel: threading.Event | None = None,
    ) -> list[VerifyResult]:
        targets = [self.find(ref)] if ref else list(self.state().models.values())
        results = []
        for target in targets:
            try:
                self.verified_path(target, progress, cancel)
                results.append(VerifyResult(target.ref, True))
            except Cancelled:
                raise  # not a finding about the model
            except RegistryError as exc:
                results.append(VerifyResult(target.ref, False, str(exc)))
        return results

    def pin(self, ref: str, pinned: bool = True) -> ModelTarget:
        target = self.find(ref)

        def change(state: RegistryState) -> RegistryState:
            pins = state.pinned | {target.ref} if pinned else state.pinned - {target.ref}
            return replace(state, pinned=frozenset(pins))

        self.update(change)
        return target

    def gc(self) -> tuple[list[str], int]:
        """Remove models other than the active, previous and pinned ones; free their blobs."""
        with self._state_lock:
            before = self.state()
            keep = before.keep()
            removed = {ref for ref in before.models if ref not in keep}
            state = before.removed(removed)
            # Forget first: a crash here leaves unreferenced blobs, never the reverse.
            self.save(state)
        if self.standalone and removed:  # the local repository stops offering them too
            writer = self._local_writer()
            for ref in removed:
                target = before.models[ref]
                writer.remove_target(target.path)
                shutil.rmtree(
                    writer.targets_dir / "models" / target.name / target.version, ignore_errors=True
                )
            writer.publish()
        referenced: set[str] = set()
        bundles: set[str] = set()
        for target in state.models.values():
            referenced.add(target.sha256)
            if target.is_bundle:
                bundles.add(target.sha256)
                referenced.update(m.sha256 for m in self._bundle_members(target))
        with self._state_lock:
            for digests in self._installing.values():
                referenced |= digests
                bundles |= digests
        freed = 0
        for digest in self.blobs.blob_digests() - referenced:
            freed += self.blobs.size_of(digest)
            self.blobs.remove_blob(digest)
        for digest in self.blobs.bundle_digests() - bundles:
            self.blobs.remove_bundle(digest)
        return sorted(removed), freed

    def clear_interrupted_imports(self) -> None:
        """Partial downloads stay to be resumed; half-done imports go."""
        self.blobs.clear_staging(keep=lambda p: p.name.endswith(".partial"))
