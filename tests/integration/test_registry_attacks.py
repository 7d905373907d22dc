"""Attacks on the signed model registry, against a fleet repository served over real HTTP.

Each test builds a TUF repository with :class:`RepositoryWriter`, serves its folder with aiohttp
on 127.0.0.1 (on an event loop in a thread of its own, so the registry's blocking urllib3 calls
run exactly as on a device), installs a good model, makes it active, then attacks. Every attack
must raise its precise registry error, install nothing, and leave the active model verifiable:
an attack on the repository stops updates, never the model that is already serving.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import gc
import hashlib
import random
import shutil
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from securesystemslib.signer import Signer
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp

from edgelm_agent.registry.errors import (
    DownloadError,
    ExpiredMetadata,
    InvalidModelMetadata,
    MetadataTooLarge,
    RegistryError,
    RollbackAttack,
    TargetMismatch,
    UnsafeTargetPath,
    VerificationError,
)
from edgelm_agent.registry.mirrors import CHUNK_BYTES
from edgelm_agent.registry.model_target import ModelTarget
from edgelm_agent.registry.registry import Registry, RegistryConfig
from edgelm_agent.registry.trust import TrustLimits
from edgelm_protocol.repository.writer import RepositoryWriter, generate_key
from tests.agent_process import TINY_GGUF, AgentProcess, free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

E = TypeVar("E", bound=RegistryError)

TOP_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
ENDLESS_BYTES = 1 << 30  # far past every limit; a real attacker's stream would never end


# --- the fleet repository, served over HTTP ----------------------------------------------------


@dataclass
class Served:
    """One response of a test handler: where it started and how many body bytes it sent."""

    range_start: int
    sent: int = 0


class RepoServer:
    """A repository folder over real HTTP, on an event loop running in its own thread."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.overrides: dict[str, Handler] = {}  # relative path -> handler, for misbehaviour
        self.requested: list[str] = []  # every relative path asked for, in order
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="repo-server")
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        # Bounds teardown should a handler still be writing to a client that stopped reading.
        self._runner = web.AppRunner(app, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Close the server and its loop; safe to call twice."""
        if self._thread.is_alive():
            if self._runner is not None:
                cleanup = self._runner.cleanup()
                asyncio.run_coroutine_threadsafe(cleanup, self._loop).result(timeout=60)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        if not self._loop.is_closed():
            self._loop.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        relative = request.match_info["path"]
        self.requested.append(relative)
        override = self.overrides.get(relative)
        if override is not None:
            return await override(request)
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)  # honours Range, like any static file server


def _range_start(header: str | None) -> int:
    if header is None:
        return 0
    if not header.startswith("bytes=") or not header.endswith("-"):
        raise web.HTTPRequestRangeNotSatisfiable()
    return int(header.removeprefix("bytes=").removesuffix("-"))


class BreakingFile:
    """Serves ``data`` with Range support; the first response drops the connection after
    ``cut`` bytes of the body, having promised all of it in Content-Length. With ``stall`` it
    goes silent instead, the way a dying link looks, and keeps the client waiting mid-body."""

    def __init__(self, data: bytes, cut: int, *, stall: bool = False) -> None:
        self.data = data
        self.cut = cut
        self.stall = stall
        self.responses: list[Served] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        start = _range_start(request.headers.get("Range"))
        served = Served(start)
        self.responses.append(served)
        first = len(self.responses) == 1
        body = self.data[start:]
        response = web.StreamResponse(status=206 if start else 200)
        response.content_length = len(body)
        if start:
            response.headers["Content-Range"] = (
                f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
            )
        await response.prepare(request)
        chunk = body[: self.cut] if first else body
        served.sent += len(chunk)  # counted before it can reach the client
        await response.write(chunk)
        if first and self.stall:
            assert request.transport is not None
            while not request.transport.is_closing():  # until the client goes away
                await asyncio.sleep(0.05)
            return response
        if first:
            assert request.transport is not None
            request.transport.close()  # flushes what was written, then hangs up mid-body
        return response


async def endless(request: web.Request) -> web.StreamResponse:
    """A response that keeps coming: the endless-data attack."""
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    chunk = b" " * 65536
    for _ in range(ENDLESS_BYTES // len(chunk)):
        await response.write(chunk)  # raises once the client hangs up
    return response


# --- building and tampering with the repository -------------------------------------------------


@functools.cache
def tiny_gguf() -> bytes:
    return TINY_GGUF.read_bytes()


def model_bytes(name: str, version: str) -> bytes:
    """tiny@1.0 is the fixture itself; any other model is the fixture with a distinct tail."""
    if (name, version) == ("tiny", "1.0"):
        return tiny_gguf()
    return tiny_gguf() + f"\0edgelm-test {name}@{version}".encode()


def edgelm_custom(name: str, version: str) -> dict[str, Any]:
    return {
        "edgelm": {
            "name": name,
            "version": version,
            "format": "gguf",
            "backend": "llama.cpp",
            "context_length": 512,
            "chat_template": None,
            "quantization": "F32",
            "min_ram_bytes": 1_000_000,
            "sampling": {},
            "health_check": {},
        }
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_new_version(
    writer: RepositoryWriter, role: str, signers: Sequence[Signer] | None = None
) -> None:
    """Bump one role's version, sign it (by its own keys unless told) and write it, alone."""
    writer.md[role].signed.version += 1
    writer.sign(role, signers)
    writer.write_signed(role)


def publish_signed_by(writer: RepositoryWriter, role: str, signers: Sequence[Signer]) -> None:
    """Publish a new version of every top-level role (and root, if it is the one), with
    ``role`` signed by ``signers`` and every other role by its own keys."""
    md = writer.md
    chain = ((Root.type,) if role == Root.type else ()) + TOP_ROLES
    for name in chain:
        md[name].signed.version += 1
    md[Snapshot.type].signed.meta["targets.json"] = MetaFile(
        version=md[Targets.type].signed.version
    )
    md[Timestamp.type].signed.snapshot_meta = MetaFile(version=md[Snapshot.type].signed.version)
    for name in chain:
        writer.sign(name, signers if name == role else None)
        writer.write_signed(name)


def point_timestamp_at(writer: RepositoryWriter, snapshot: MetaFile) -> None:
    writer.md[Timestamp.type].signed.snapshot_meta = snapshot
    write_new_version(writer, Timestamp.type)


def replace_file(path: Path, data: bytes) -> None:
    """New content under the same name, never through a hard link to another file."""
    path.unlink()
    path.write_bytes(data)


class Fleet:
    """A fleet repository in a folder, its keys, its HTTP server, and devices that trust it."""

    def __init__(self, tmp: Path, *, threshold: int = 1, keys_per_role: int = 1) -> None:
        self.tmp = tmp
        self.repo = tmp / "repo"
        self.metadata = self.repo / "metadata"
        self.sources = tmp / "sources"
        self.sources.mkdir(parents=True)
        self.writer = RepositoryWriter.create(
            self.repo, tmp / "keys", threshold=threshold, keys_per_role=keys_per_role
        )
        self.anchor = tmp / "anchor-1.root.json"  # what a device is provisioned with
        shutil.copyfile(self.metadata / "1.root.json", self.anchor)
        self.server = RepoServer(self.repo)
        self._devices = 0

    def add_model(
        self,
        name: str,
        version: str,
        *,
        data: bytes | None = None,
        custom: dict[str, Any] | None = None,
        plain: bool = False,
    ) -> TargetFile:
        """List a model in targets (not yet published); ``plain`` leaves out ``custom``."""
        source = self.sources / f"{name}-{version}.gguf"
        source.write_bytes(model_bytes(name, version) if data is None else data)
        if not plain and custom is None:
            custom = edgelm_custom(name, version)
        # link=False: the repository must never share an inode with a file a test tampers with.
        return self.writer.add_target(
            f"models/{name}/{version}/model.gguf", source, custom, link=False
        )

    def publish_model(self, name: str, version: str, **kwargs: Any) -> TargetFile:
        info = self.add_model(name, version, **kwargs)
        self.writer.publish()
        return info

    def blob_file(self, info: TargetFile) -> Path:
        """Where the repository keeps a target: under its consistent-snapshot name."""
        directory, filename = info.path.rsplit("/", 1)
        return self.repo / "targets" / directory / f"{info.hashes['sha256']}.{filename}"

    def blob_url_path(self, info: TargetFile) -> str:
        return self.blob_file(info).relative_to(self.repo).as_posix()

    def version(self, role: str) -> int:
        version: int = self.writer.md[role].signed.version
        return version

    def device(self, *mirrors: str) -> Registry:
        """A new device trusting this fleet, a few folders deep so a path that climbs out of
        its registry lands somewhere this test can see."""
        self._devices += 1
        root = self.tmp / "sandbox" / "a" / "b" / f"device{self._devices}"
        return Registry(
            RegistryConfig(
                root=root,
                mirrors=mirrors or (self.server.url,),
                trust_root=self.anchor,
                free_margin_bytes=0,
            )
        )


FleetFactory = Callable[..., Fleet]


@pytest.fixture
def make_fleet(short_tmp: Path) -> Iterator[FleetFactory]:
    """Fleets serving tiny@1.0 over HTTP; every server is stopped at teardown."""
    fleets: list[Fleet] = []

    def make(*, threshold: int = 1, keys_per_role: int = 1) -> Fleet:
        fleet = Fleet(
            short_tmp / f"fleet{len(fleets)}", threshold=threshold, keys_per_role=keys_per_role
        )
        fleets.append(fleet)
        fleet.server.start()
        fleet.publish_model("tiny", "1.0")
        return fleet

    yield make
    gc.collect()  # close the sockets of downloads a test abandoned, so no handler waits on them
    for fleet in fleets:
        fleet.server.stop()


@pytest.fixture
def fleet(make_fleet: FleetFactory) -> Fleet:
    return make_fleet()


# --- the device side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    models: dict[str, ModelTarget]
    active: str | None
    blobs: frozenset[str]


def view(device: Registry) -> DeviceView:
    state = device.state()
    return DeviceView(dict(state.models), state.active, frozenset(device.blobs.blob_digests()))


def install_active(device: Registry, name: str = "tiny", version: str = "1.0") -> DeviceView:
    """Install a good model, make it active, and return the device as it then is."""
    target = device.install(name, version)
    device.save(replace(device.state(), active=target.ref))
    return view(device)


def assert_unchanged_and_serving(device: Registry, before: DeviceView) -> None:
    """Nothing installed, no new blob, and the active model still verifies from its blob."""
    assert view(device) == before
    assert before.active is not None
    target = device.find(before.active)
    path = device.verified_path(target)
    assert sha256(path.read_bytes()) == target.sha256


def staged(device: Registry) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in device.blobs.staging.iterdir()}


def expect_error(kind: type[E], action: Callable[[], object]) -> E:
    """Run ``action`` and return the error it raised, which must be exactly ``kind``."""
    with pytest.raises(kind) as caught:
        action()
    assert type(caught.value) is kind, repr(caught.value)
    return caught.value


# --- 1, 2: tampered blobs ----------------------------------------------------------------------


class TestTamperedBlob:
    def test_flipped_byte_is_refused(self, fleet: Fleet) -> None:
        """A blob changed by one byte after signing fails the sha256 check and is discarded."""
        device = fleet.device()
        before = install_active(device)
        info = fleet.publish_model("tiny", "2.0")
        blob = bytearray(fleet.blob_file(info).read_bytes())
        blob[len(blob) // 2] ^= 0x01
        replace_file(fleet.blob_file(info), bytes(blob))

        error = expect_error(TargetMismatch, lambda: device.install("tiny", "2.0"))

        assert error.code == "target_mismatch"
        assert info.hashes["sha256"][:16] in str(error)
        assert staged(device) == {}  # the bad bytes are not kept to "resume" from
        assert_unchanged_and_serving(device, before)

    def test_flipped_byte_on_a_usb_mirror_is_refused(self, fleet: Fleet) -> None:
        """A folder mirror gets the same hash check as HTTP: its bytes earn no extra trust."""
        device = fleet.device(str(fleet.repo))
        before = install_active(device)
        info = fleet.publish_model("tiny", "2.0")
        blob = bytearray(fleet.blob_file(info).read_bytes())
        blob[-1] ^= 0x80
        replace_file(fleet.blob_file(info), bytes(blob))

        expect_error(TargetMismatch, lambda: device.install("tiny", "2.0"))

        assert_unchanged_and_serving(device, before)

    def test_truncated_blob_is_refused(self, fleet: Fleet) -> None:
        """A blob cut short on the mirror is refused as a DownloadError, short of its length."""
        # DownloadError, not TargetMismatch: a body that ends before the signed length looks
        # exactly like a dropped connection, so the prefix is kept to resume from; nothing
        # shorter than the signed length (and of another sha256) is ever committed.
        device = fleet.device()
        before = install_active(device)
        info = fleet.publish_model("tiny", "2.0")
        half = info.length // 2
        replace_file(fleet.blob_file(info), fleet.blob_file(info).read_bytes()[:half])

        error = expect_error(DownloadError, lambda: device.install("tiny", "2.0"))

        assert error.code == "download_failed"
        assert f"transfer ended at {half} of {info.length} bytes" in str(error)
        assert staged(device) == {f"{info.hashes['sha256']}.partial": half}
        assert_unchanged_and_serving(device, before)

    def test_overlong_blob_is_refused(self, fleet: Fleet) -> None:
        """A blob longer than signed is refused as soon as the body passes the signed length."""
        device = fleet.device()
        before = install_active(device)
        info = fleet.publish_model("tiny", "2.0")
        replace_file(fleet.blob_file(info), fleet.blob_file(info).read_bytes() + b"\0" * 4096)

        error = expect_error(TargetMismatch, lambda: device.install("tiny", "2.0"))

        assert f"more than the signed length of {info.length} bytes" in str(error)
        assert_unchanged_and_serving(device, before)

    def test_endless_blob_is_refused(self, fleet: Fleet) -> None:
        """A mirror streaming a target forever is cut off at the signed length."""
        device = fleet.device()
        before = install_active(device)
        info = fleet.publish_model("tiny", "2.0")
        fleet.server.overrides[fleet.blob_url_path(info)] = endless

        error = expect_error(TargetMismatch, lambda: device.install("tiny", "2.0"))

        assert f"more than the signed length of {info.length} bytes" in str(error)
        assert_unchanged_and_serving(device, before)

    def test_metadata_cut_mid_body_is_a_download_error(self, fleet: Fleet) -> None:
        """A metadata response that breaks off mid-body is a DownloadError, nothing else."""
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0")
        timestamp = (fleet.metadata / "timestamp.json").read_bytes()
        fleet.server.overrides["metadata/timestamp.json"] = BreakingFile(
            timestamp, len(timestamp) // 2
        )

        expect_error(DownloadError, lambda: device.install("tiny", "2.0"))

        assert_unchanged_and_serving(device, before)


# --- 3, 4: signatures --------------------------------------------------------------------------


ALL_ROLES = (Root.type, *TOP_ROLES)


class TestSignatures:
    @pytest.mark.parametrize("role", ALL_ROLES)
    def test_wrong_key_is_refused(self, fleet: Fleet, role: str) -> None:
        """Metadata signed by a fresh key that root does not list fails verification."""
        device = fleet.device()
        before = install_active(device)
        fleet.add_model("tiny", "2.0")
        rogue = generate_key(fleet.tmp / "rogue.pem")
        publish_signed_by(fleet.writer, role, [rogue])

        error = expect_error(VerificationError, lambda: device.install("tiny", "2.0"))

        assert error.code == "bad_signature"
        assert f"{role} was signed by 0/1 keys" in str(error)
        assert isinstance(error.__cause__, tuf_exceptions.UnsignedMetadataError)
        assert_unchanged_and_serving(device, before)

    @pytest.mark.parametrize("role", ALL_ROLES)
    def test_below_threshold_is_refused(self, make_fleet: FleetFactory, role: str) -> None:
        """With a threshold of 2, metadata signed by one of its two keys fails verification."""
        fleet = make_fleet(threshold=2, keys_per_role=2)
        device = fleet.device()
        before = install_active(device)  # both keys signed this one
        fleet.add_model("tiny", "2.0")
        publish_signed_by(fleet.writer, role, fleet.writer.signers[role][:1])

        error = expect_error(VerificationError, lambda: device.install("tiny", "2.0"))

        assert f"{role} was signed by 1/2 keys" in str(error)
        assert_unchanged_and_serving(device, before)

    def test_one_key_signing_twice_does_not_meet_threshold(self, make_fleet: FleetFactory) -> None:
        """Two signatures by the same key count once toward a threshold of 2."""
        fleet = make_fleet(threshold=2, keys_per_role=2)
        device = fleet.device()
        before = install_active(device)
        fleet.add_model("tiny", "2.0")
        key = fleet.writer.signers[Targets.type][0]
        publish_signed_by(fleet.writer, Targets.type, [key, key])

        error = expect_error(VerificationError, lambda: device.install("tiny", "2.0"))

        assert "targets was signed by 1/2 keys" in str(error)
        assert_unchanged_and_serving(device, before)


# --- 5: expiry ---------------------------------------------------------------------------------


class TestExpiry:
    def test_expired_timestamp_stops_installs_not_the_active_model(self, fleet: Fleet) -> None:
        """An expired timestamp refuses installs; the active model verifies regardless."""
        # verified_path re-hashes the blob against the target recorded in state.json and never
        # looks at metadata, so neither expiry nor an unreachable repository can touch it.
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0")
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        fleet.writer.md[Timestamp.type].signed.expires = now - datetime.timedelta(days=1)
        write_new_version(fleet.writer, Timestamp.type)

        error = expect_error(ExpiredMetadata, lambda: device.install("tiny", "2.0"))

        assert error.code == "metadata_expired"
        assert "timestamp.json is expired" in str(error)
        assert isinstance(error.__cause__, tuf_exceptions.ExpiredMetadataError)
        assert_unchanged_and_serving(device, before)

        # Far in the future every piece of metadata, root included, has expired; then the
        # repository goes away altogether: the active model still verifies.
        device.clock.advance(datetime.datetime(2100, 1, 1, tzinfo=datetime.UTC))
        error = expect_error(ExpiredMetadata, device.available)
        assert "root.json is expired" in str(error)
        fleet.server.stop()
        expect_error(DownloadError, device.available)
        assert_unchanged_and_serving(device, before)
        assert all(result.ok for result in device.verify())


# --- 6: rollback -------------------------------------------------------------------------------


class TestRollback:
    @staticmethod
    def device_seeing_newer(fleet: Fleet) -> tuple[Registry, DeviceView]:
        """A device serving tiny@1.0 that has since trusted metadata listing tiny@2.0."""
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0")
        assert "tiny@2.0" in device.available()
        return device, before

    def test_replayed_old_timestamp_is_refused(self, fleet: Fleet) -> None:
        """A mirror replaying an older, validly signed timestamp is caught by its version."""
        old_timestamp = (fleet.metadata / "timestamp.json").read_bytes()
        device, before = self.device_seeing_newer(fleet)
        replace_file(fleet.metadata / "timestamp.json", old_timestamp)

        error = expect_error(RollbackAttack, lambda: device.install("tiny", "2.0"))

        assert error.code == "rollback_detected"
        assert "New timestamp version 2 must be >= 3" in str(error)
        assert_unchanged_and_serving(device, before)

    def test_timestamp_naming_older_snapshot_is_refused(self, fleet: Fleet) -> None:
        """A fresh timestamp pointing back at an older snapshot is refused."""
        device, before = self.device_seeing_newer(fleet)
        point_timestamp_at(fleet.writer, MetaFile(version=fleet.version(Snapshot.type) - 1))

        error = expect_error(RollbackAttack, lambda: device.install("tiny", "2.0"))

        assert "New snapshot version must be >= 3, got version 2" in str(error)
        assert_unchanged_and_serving(device, before)

    def test_snapshot_naming_older_targets_is_refused(self, fleet: Fleet) -> None:
        """A device that has seen targets v3 refuses a newer snapshot that claims targets v2."""
        device, before = self.device_seeing_newer(fleet)
        assert fleet.version(Targets.type) == 3
        fleet.writer.md[Snapshot.type].signed.meta["targets.json"] = MetaFile(version=2)
        write_new_version(fleet.writer, Snapshot.type)
        point_timestamp_at(fleet.writer, MetaFile(version=fleet.version(Snapshot.type)))

        error = expect_error(RollbackAttack, lambda: device.install("tiny", "2.0"))

        # python-tuf swaps the numbers in this message: 2 is what it got, 3 what it expected.
        assert "targets.json version 2, got 3" in str(error)
        assert isinstance(error.__cause__, tuf_exceptions.BadVersionNumberError)
        assert_unchanged_and_serving(device, before)


# --- 7: mix and match --------------------------------------------------------------------------


class TestMixAndMatch:
    def test_targets_file_from_another_version_is_refused(self, fleet: Fleet) -> None:
        """N.targets.json holding another version's validly signed content is refused."""
        # python-tuf raises BadVersionNumberError (the file's version is not the snapshot's),
        # which translate() reports as RollbackAttack.
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0")
        replace_file(
            fleet.metadata / "3.targets.json", (fleet.metadata / "2.targets.json").read_bytes()
        )

        error = expect_error(RollbackAttack, lambda: device.install("tiny", "2.0"))

        assert type(error.__cause__) is tuf_exceptions.BadVersionNumberError
        assert "Expected targets v3, got v2" in str(error)
        assert_unchanged_and_serving(device, before)

    def test_snapshot_from_another_repository_is_refused(
        self, make_fleet: FleetFactory, fleet: Fleet
    ) -> None:
        """A snapshot of the right version but from another repository fails its signature."""
        other = make_fleet()
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0")
        other.publish_model("tiny", "2.0")
        name = f"{fleet.version(Snapshot.type)}.snapshot.json"
        assert other.version(Snapshot.type) == fleet.version(Snapshot.type)
        replace_file(fleet.metadata / name, (other.metadata / name).read_bytes())

        error = expect_error(VerificationError, lambda: device.install("tiny", "2.0"))

        assert type(error.__cause__) is tuf_exceptions.UnsignedMetadataError
        assert "snapshot was signed by 0/1 keys" in str(error)
        assert_unchanged_and_serving(device, before)

    def test_snapshot_from_another_state_fails_the_pinned_hash(self, fleet: Fleet) -> None:
        """A signed snapshot of the pinned version but another state fails the pinned hash."""
        # python-tuf raises LengthOrHashMismatchError, which translate() maps to TargetMismatch.
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0")
        version = fleet.version(Snapshot.type)
        genuine = (fleet.metadata / f"{version}.snapshot.json").read_bytes()
        # The same snapshot version, as it was before tiny@2.0: still listing targets v2.
        fleet.writer.md[Snapshot.type].signed.meta["targets.json"] = MetaFile(version=2)
        fleet.writer.sign(Snapshot.type)
        fleet.writer.write_signed(Snapshot.type)
        point_timestamp_at(
            fleet.writer,
            MetaFile(version=version, length=len(genuine), hashes={"sha256": sha256(genuine)}),
        )

        error = expect_error(TargetMismatch, lambda: device.install("tiny", "2.0"))

        assert type(error.__cause__) is tuf_exceptions.LengthOrHashMismatchError
        assert "length or hash mismatch" in str(error)
        assert_unchanged_and_serving(device, before)


# --- 8: endless data ---------------------------------------------------------------------------


LIMITS = TrustLimits()


class TestEndlessData:
    def test_padded_timestamp_is_refused(self, fleet: Fleet) -> None:
        """A validly signed timestamp padded past timestamp_max_bytes is cut off at the limit."""
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0")
        path = fleet.metadata / "timestamp.json"
        replace_file(path, path.read_bytes() + b" " * LIMITS.timestamp_max_bytes)

        error = expect_error(MetadataTooLarge, lambda: device.install("tiny", "2.0"))

        assert error.code == "metadata_too_large"
        assert f"maximum allowed length of {LIMITS.timestamp_max_bytes}" in str(error)
        assert isinstance(error.__cause__, tuf_exceptions.DownloadLengthMismatchError)
        assert_unchanged_and_serving(device, before)

    @pytest.mark.parametrize(
        ("role", "limit"),
        [
            (Root.type, LIMITS.root_max_bytes),
            (Timestamp.type, LIMITS.timestamp_max_bytes),
            (Snapshot.type, LIMITS.snapshot_max_bytes),
            (Targets.type, LIMITS.targets_max_bytes),
        ],
    )
    def test_endless_metadata_is_cut_off(self, fleet: Fleet, role: str, limit: int) -> None:
        """Metadata that streams forever is cut off at the role's size limit."""
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0")
        names = {
            Root.type: f"{fleet.version(Root.type) + 1}.root.json",  # the next root, if any
            Timestamp.type: "timestamp.json",
            Snapshot.type: f"{fleet.version(Snapshot.type)}.snapshot.json",
            Targets.type: f"{fleet.version(Targets.type)}.targets.json",
        }
        fleet.server.overrides[f"metadata/{names[role]}"] = endless

        error = expect_error(MetadataTooLarge, lambda: device.install("tiny", "2.0"))

        assert f"maximum allowed length of {limit}" in str(error)
        assert_unchanged_and_serving(device, before)


# --- 9, 10: signed but unusable targets --------------------------------------------------------


def sandbox_files(fleet: Fleet, device: Registry) -> set[str]:
    """Every file in the fleet's folder, but for the device's metadata cache and clock."""
    skip = (device.config.root / "metadata", device.config.root / "clock.json")
    return {
        p.relative_to(fleet.tmp).as_posix()
        for p in fleet.tmp.rglob("*")
        if p.is_file() and not any(p == s or p.is_relative_to(s) for s in skip)
    }


def sign_raw_target(fleet: Fleet, path: str, data: bytes, custom: dict[str, Any]) -> None:
    """List a target under any path at all, bypassing the writer's file placement."""
    info = TargetFile.from_data(path, data, ["sha256"])
    info.unrecognized_fields["custom"] = custom
    fleet.writer.md[Targets.type].signed.targets[path] = info
    fleet.writer.publish()


class TestUnsafeTargetPath:
    @pytest.mark.parametrize(
        ("path", "name", "version", "why"),
        [
            ("models/x/1.0/../../../evil.gguf", "x", "1.0", "must be models/NAME/VERSION/FILE"),
            ("models/x/../evil.gguf", "x", None, "model version must be"),
            ("models/x/1.0/..%2F..%2Fevil.gguf", "x", "1.0", "unsafe file name"),
            ("models/x/1.0/..\\..\\evil.gguf", "x", "1.0", "forbidden characters"),
            ("models/x/1.0//etc/passwd", "x", "1.0", "must be models/NAME/VERSION/FILE"),
        ],
    )
    def test_traversal_target_is_refused(
        self, fleet: Fleet, path: str, name: str, version: str | None, why: str
    ) -> None:
        """A signed target path that could climb out of the store is refused, nothing fetched."""
        device = fleet.device()
        before = install_active(device)
        sign_raw_target(fleet, path, model_bytes("x", "1.0"), edgelm_custom("x", "1.0"))
        files = sandbox_files(fleet, device)
        fleet.server.requested.clear()

        error = expect_error(UnsafeTargetPath, lambda: device.install(name, version))

        assert error.code == "unsafe_target_path"
        assert why in str(error)
        assert not [p for p in fleet.server.requested if p.startswith("targets/")]
        assert sandbox_files(fleet, device) == files
        assert staged(device) == {}
        assert_unchanged_and_serving(device, before)

    def test_traversal_out_of_models_is_never_offered(self, fleet: Fleet) -> None:
        """models/../../etc/passwd is never offered, and looking it up raises UnsafeTargetPath."""
        device = fleet.device()
        before = install_active(device)
        path = "models/../../etc/passwd"
        sign_raw_target(fleet, path, b"root:x:0:0::/root:/bin/sh\n", edgelm_custom("x", "1.0"))

        assert set(device.available()) == {"tiny@1.0"}
        trust = device.trust()
        trust.refresh()
        error = expect_error(UnsafeTargetPath, lambda: trust.target(path))

        assert "must be models/NAME/VERSION/FILE" in str(error)
        assert_unchanged_and_serving(device, before)


def without(key: str) -> dict[str, Any]:
    custom = edgelm_custom("tiny", "2.0")
    del custom["edgelm"][key]
    return custom


def changed(**changes: Any) -> dict[str, Any]:
    custom = edgelm_custom("tiny", "2.0")
    custom["edgelm"].update(changes)
    return custom


class TestModelMetadata:
    def test_target_without_custom_is_refused(self, fleet: Fleet) -> None:
        """A signed target with no custom object at all cannot be installed."""
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0", plain=True)

        error = expect_error(InvalidModelMetadata, lambda: device.install("tiny", "2.0"))

        assert error.code == "invalid_model_metadata"
        assert "has no custom 'edgelm' metadata" in str(error)
        assert set(device.available()) == {"tiny@1.0"}  # one bad entry hides no other
        assert staged(device) == {}
        assert_unchanged_and_serving(device, before)

    @pytest.mark.parametrize(
        ("custom", "why"),
        [
            ({"other": edgelm_custom("tiny", "2.0")["edgelm"]}, "no custom 'edgelm' metadata"),
            ({"edgelm": "gguf"}, "no custom 'edgelm' metadata"),
            (without("context_length"), "lacks custom field edgelm.context_length"),
            (without("backend"), "lacks custom field edgelm.backend"),
            (changed(format="exe"), "unknown format 'exe'"),
            (changed(backend="onnxruntime-genai"), "runs on llama.cpp"),
            (changed(version="1.0"), "edgelm.name/version disagree with its path"),
            (changed(context_length=0), "context_length must be at least 128, got 0"),
            (changed(context_length=8), "context_length must be at least 128, got 8"),
            (changed(min_ram_bytes="lots"), "edgelm.min_ram_bytes has the wrong type"),
        ],
    )
    def test_target_with_bad_custom_is_refused(
        self, fleet: Fleet, custom: dict[str, Any], why: str
    ) -> None:
        """A signed target whose custom 'edgelm' object is incomplete or wrong is refused."""
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0", custom=custom)

        error = expect_error(InvalidModelMetadata, lambda: device.install("tiny", "2.0"))

        assert why in str(error)
        assert_unchanged_and_serving(device, before)


# --- the good paths ----------------------------------------------------------------------------


class TestInstall:
    def test_good_model_installs_over_http(self, fleet: Fleet) -> None:
        """The signed model installs over HTTP; installing it again fetches nothing."""
        device = fleet.device()

        assert set(device.available()) == {"tiny@1.0"}
        target = device.install("tiny")

        assert (target.ref, target.format, target.backend) == ("tiny@1.0", "gguf", "llama.cpp")
        assert (target.context_length, target.quantization) == (512, "F32")
        assert (target.length, target.sha256) == (len(tiny_gguf()), sha256(tiny_gguf()))
        assert device.state().models == {"tiny@1.0": target}
        assert device.blobs.blob_digests() == {target.sha256}
        assert device.verified_path(target).read_bytes() == tiny_gguf()
        assert staged(device) == {}

        fleet.server.requested.clear()
        device.install("tiny", "1.0")
        assert not [p for p in fleet.server.requested if p.startswith("targets/")]

    @staticmethod
    def interrupt_then_resume(fleet: Fleet, name: str, data: bytes) -> tuple[int, BreakingFile]:
        """Install a model whose first download breaks off halfway, then install it again;
        return how many bytes the first attempt kept, and what the server sent each time."""
        info = fleet.publish_model(name, "1.0", data=data)
        flaky = BreakingFile(data, len(data) // 2)
        fleet.server.overrides[fleet.blob_url_path(info)] = flaky
        device = fleet.device()

        expect_error(DownloadError, lambda: device.install(name, "1.0"))

        kept = staged(device)[f"{info.hashes['sha256']}.partial"]
        assert device.state().models == {}
        assert device.blobs.blob_digests() == set()

        target = device.install(name, "1.0")

        assert device.verified_path(target).read_bytes() == data
        assert staged(device) == {}
        first, second = flaky.responses
        assert (first.range_start, first.sent) == (0, flaky.cut)
        assert (second.range_start, second.sent) == (kept, len(data) - kept)
        return kept, flaky

    def test_interrupted_download_resumes(self, fleet: Fleet) -> None:
        """A dropped multi-chunk download resumes with a Range request for the rest only."""
        # mirrors.py keeps all but the chunk in flight (CHUNK_BYTES), hence a 3 MiB model.
        data = b"GGUF" + random.Random(7).randbytes(3 * CHUNK_BYTES + 12_345)

        kept, flaky = self.interrupt_then_resume(fleet, "big", data)

        assert 0 < kept <= flaky.cut
        assert kept >= flaky.cut - CHUNK_BYTES  # mirrors.py: at most the chunk in flight is lost
        assert flaky.responses[1].sent < len(data)

    def test_interrupted_download_of_the_tiny_model_resumes(self, fleet: Fleet) -> None:
        """The tiny model's dropped download keeps its first half and fetches only the rest."""
        kept, flaky = self.interrupt_then_resume(fleet, "tiny2", tiny_gguf())

        assert kept == flaky.cut
        assert flaky.responses[1].sent == len(tiny_gguf()) - flaky.cut


class TestMirrors:
    def test_dead_first_mirror_falls_back_to_the_second(self, fleet: Fleet) -> None:
        """With the first mirror down, metadata and model come from the second."""
        device = fleet.device(f"http://127.0.0.1:{free_port()}", fleet.server.url)

        target = device.install("tiny", "1.0")

        assert device.verified_path(target).read_bytes() == tiny_gguf()

    def test_empty_first_mirror_falls_back_to_the_second(
        self, fleet: Fleet, short_tmp: Path
    ) -> None:
        """A first mirror that answers 404 to everything is skipped for metadata and model."""
        empty = short_tmp / "empty-mirror"
        empty.mkdir()
        server = RepoServer(empty)
        server.start()
        try:
            device = fleet.device(server.url, fleet.server.url)
            target = device.install("tiny", "1.0")
        finally:
            server.stop()

        assert device.verified_path(target).read_bytes() == tiny_gguf()
        assert any(p.startswith("targets/") for p in server.requested)  # it was asked first

    def test_usb_folder_mirror_installs(self, fleet: Fleet) -> None:
        """The repository folder itself works as a mirror (the USB sideload case), offline."""
        fleet.server.stop()
        device = fleet.device(str(fleet.repo))

        target = device.install("tiny", "1.0")

        assert device.verified_path(target).read_bytes() == tiny_gguf()
        assert device.state().models == {"tiny@1.0": target}

    def test_usb_folder_after_http_keeps_the_trust_state(self, fleet: Fleet) -> None:
        """A device that updated over HTTP takes a newer model from a USB folder just as well."""
        online = fleet.device()
        before = install_active(online)
        fleet.publish_model("tiny", "2.0")
        usb = Registry(replace(online.config, mirrors=(str(fleet.repo),)))

        target = usb.install("tiny", "2.0")

        assert usb.verified_path(target).read_bytes() == model_bytes("tiny", "2.0")
        assert set(usb.state().models) == {"tiny@1.0", "tiny@2.0"}
        assert usb.state().active == before.active


class TestKillDuringDownload:
    @pytest.mark.timeout(300)
    async def test_agent_killed_mid_download_serves_the_old_model_then_resumes(
        self, fleet: Fleet, short_tmp: Path
    ) -> None:
        """kill -9 of an agent halfway through downloading a new model: it restarts serving the
        old one, keeps the unverified partial file in staging, and the next install fetches only
        the rest before the new model activates."""
        workdir = short_tmp / "device"  # the agent's state directory is workdir/state
        device = Registry(replace(fleet.device().config, root=workdir / "state" / "registry"))
        install_active(device)  # tiny@1.0, installed and active before the agent starts
        data = model_bytes("tiny", "2.0")
        info = fleet.publish_model("tiny", "2.0")
        stalling = BreakingFile(data, len(data) // 2, stall=True)
        fleet.server.overrides[fleet.blob_url_path(info)] = stalling
        env = {
            "EDGELM_REPOSITORY_MIRRORS": fleet.server.url,
            "EDGELM_REPOSITORY_ROOT": str(fleet.anchor),
            "EDGELM_DISK_MARGIN_BYTES": "0",
        }
        partial = device.blobs.staging / f"{info.hashes['sha256']}.partial"

        agent = AgentProcess(workdir, model=None, env=env).wait_ready()
        try:
            async with agent.unix_session() as s:
                install = asyncio.create_task(
                    s.post(f"{AGENT}/v1/registry/install", json={"name": "tiny", "version": "2.0"})
                )
                deadline = time.monotonic() + 60
                while not (stalling.responses and stalling.responses[0].sent and _size(partial)):
                    assert not install.done(), await install
                    assert time.monotonic() < deadline, agent.logs()
                    await asyncio.sleep(0.02)
                agent.proc.kill()  # SIGKILL mid-body: no cleanup of any kind
                assert agent.wait() == -signal.SIGKILL
                with pytest.raises(aiohttp.ClientError):
                    await install
        finally:
            agent.stop()
        kept = _size(partial)
        assert 0 < kept <= stalling.cut

        again = AgentProcess(workdir, model=None, env=env).wait_ready()
        try:
            async with again.unix_session() as s:
                assert await _active(s) == "tiny@1.0"  # the old model, verified, serves
                async with s.post(
                    f"{AGENT}/v1/completions",
                    json={"model": "tiny", "prompt": "good", "max_tokens": 3},
                ) as r:
                    assert r.status == 200, await r.text()
                async with s.post(
                    f"{AGENT}/v1/registry/install", json={"name": "tiny", "version": "2.0"}
                ) as r:
                    assert r.status == 201, await r.text()
                async with s.post(f"{AGENT}/v1/registry/activate", json={"model": "tiny@2.0"}) as r:
                    assert r.status == 200, await r.text()
                assert await _active(s) == "tiny@2.0"
        finally:
            again.stop()

        first, second = stalling.responses
        assert first.range_start == 0
        assert (second.range_start, second.sent) == (kept, len(data) - kept)  # only the rest
        assert not partial.exists()
        assert all(result.ok for result in device.verify())


AGENT = "http://localhost"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def _active(s: aiohttp.ClientSession) -> str:
    async with s.get(f"{AGENT}/v1/registry/models") as r:
        assert r.status == 200, await r.text()
        active: str = (await r.json())["active"]
        return active
