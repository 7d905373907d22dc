"""Pushing models to the fleet's TUF repository through ``POST /api/v1/models``, and serving it.

The operator's side is real (python-tuf metadata signed with the fleet's offline targets
key); so are the control plane, its HTTP server and the files it writes. An attack must
leave the repository exactly as it was: same timestamp, no new files, no new model.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.ngclient import Updater

from edgelm_protocol import Announce, Topic, decode
from edgelm_protocol.mqtt import MqttClient, MqttSettings
from tests.integration.control.conftest import Running, StartControl, until
from tests.integration.control.fleet import Fleet, Push, forged_signer, sha256


def form(push: Push, *, names: dict[str, str] | None = None) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field(
        "targets", push.targets, filename="targets.json", content_type="application/json"
    )
    for digest, blob in push.blobs.items():
        name = (names or {}).get(digest, digest)
        data.add_field(name, blob, filename=name, content_type="application/octet-stream")
    return data


async def upload(control: Running, push: Push, **kwargs: Any) -> tuple[int, Any]:
    return await control.call("POST", "/api/v1/models", data=form(push, **kwargs))


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


class Snapshot_:
    """The repository's published state, to compare before and after a refused push."""

    def __init__(self, fleet: Fleet) -> None:
        self.timestamp = fleet.timestamp_version()
        self.files = files_under(fleet.repository_dir / "metadata") | files_under(
            fleet.repository_dir / "targets"
        )

    @classmethod
    def of(cls, fleet: Fleet) -> Snapshot_:
        return cls(fleet)


async def assert_unchanged(control: Running, fleet: Fleet, before: Snapshot_) -> None:
    after = Snapshot_.of(fleet)
    assert after.timestamp == before.timestamp
    assert after.files == before.files
    status, models = await control.call("GET", "/api/v1/models")
    assert status == 200
    assert models["data"] == []


class TestPush:
    async def test_a_signed_model_is_published_served_and_announced(
        self, start_control: StartControl, fleet: Fleet, tmp_path: Path
    ):
        """A push signed with the targets key becomes a target devices can verify with
        python-tuf, its blob is served with Range, and the new timestamp is announced."""
        control = await start_control()
        announced: list[int] = []
        watcher = MqttClient(
            MqttSettings(host="127.0.0.1", port=control.port, client_id="watcher", clean_start=True)
        )
        await watcher.start()
        await watcher.wait_connected()
        await watcher.subscribe([(Topic.announce(fleet.name).value, 1)])

        async def watch() -> None:
            async for message in watcher.messages():
                body = decode(message.topic, message.payload).body
                assert isinstance(body, Announce)
                announced.append(body.timestamp_version)

        watching = asyncio.get_running_loop().create_task(watch())
        push = fleet.gguf_push("smollm2", "1.0")
        status, body = await upload(control, push)
        assert status == 201, body
        assert [m["model"] for m in body["added"]] == ["smollm2@1.0"]
        assert fleet.timestamp_version() == 2
        await until(lambda: 2 in announced)
        watching.cancel()
        await watcher.stop()

        # A device's python-tuf client, trusting the fleet's root, finds and verifies it.
        root = (fleet.repository_dir / "metadata" / "1.root.json").read_bytes()
        meta_dir = tmp_path / "client"
        meta_dir.mkdir()
        updater = Updater(
            bootstrap=root,
            metadata_dir=str(meta_dir),
            metadata_base_url=f"{control.url}/repository/metadata/",
            target_base_url=f"{control.url}/repository/targets/",
            target_dir=str(tmp_path),
        )
        await asyncio.to_thread(updater.refresh)
        info = await asyncio.to_thread(updater.get_targetinfo, push.paths[0])
        assert info is not None
        path = await asyncio.to_thread(updater.download_target, info)
        downloaded = await asyncio.to_thread(Path(path).read_bytes)
        assert sha256(downloaded) == info.hashes["sha256"]

        status, partial = await control.call(
            "GET",
            f"/repository/targets/models/smollm2/1.0/{info.hashes['sha256']}.model.gguf",
            auth=False,
            headers={"Range": "bytes=10-19"},
        )
        assert status == 206
        assert partial == next(iter(push.blobs.values()))[10:20]
        status, models = await control.call("GET", "/api/v1/models")
        assert [m["model"] for m in models["data"]] == ["smollm2@1.0"]

    async def test_an_onnx_bundle_needs_its_manifest_and_every_member(
        self, start_control: StartControl, fleet: Fleet
    ):
        """A bundle target is accepted with all its members, stored by hash under files/."""
        control = await start_control()
        members = {"model.onnx": b"onnx" * 100, "genai_config.json": b"{}"}
        push = fleet.onnx_push("tiny", "1", members)
        missing = Push(push.targets, dict(list(push.blobs.items())[:2]), push.paths)
        before = Snapshot_.of(fleet)
        status, body = await upload(control, missing)
        assert status == 400
        assert body["error"]["code"] == "missing_blob"
        await assert_unchanged(control, fleet, before)
        status, body = await upload(control, push)
        assert status == 201, body
        for data in members.values():
            assert (fleet.repository_dir / "targets/models/tiny/1/files" / sha256(data)).is_file()


class TestRefusedPushes:
    async def test_a_forged_targets_signature_publishes_nothing(
        self, start_control: StartControl, fleet: Fleet, tmp_path: Path
    ):
        """Targets signed by a key root does not trust are refused (422), nothing changes."""
        control = await start_control()
        before = Snapshot_.of(fleet)
        push = fleet.sign_push(
            {"models/evil/1/model.gguf": (b"evil" * 10, _custom("evil", "1"))},
            signer=forged_signer(tmp_path),
        )
        status, body = await upload(control, push)
        assert status == 422
        assert body["error"]["code"] == "forged_targets"
        await assert_unchanged(control, fleet, before)

    async def test_forged_targets_are_refused_before_the_blobs_are_read(
        self, start_control: StartControl, fleet: Fleet, tmp_path: Path
    ):
        """With the targets part first, a forged push is refused without reading (or
        writing) the blob behind it: the answer comes, and .incoming holds nothing."""
        control = await start_control()
        blob = b"\0" * (16 << 20)
        push = fleet.sign_push(
            {"models/evil/1/model.gguf": (blob, _custom("evil", "1"))},
            signer=forged_signer(tmp_path),
        )
        status, body = await upload(control, push)
        assert status == 422
        assert body["error"]["code"] == "forged_targets"
        incoming = fleet.repository_dir / ".incoming"
        assert not incoming.exists() or not any(incoming.iterdir())

    async def test_a_wrong_version_publishes_nothing(
        self, start_control: StartControl, fleet: Fleet
    ):
        """A version that is not the current one + 1 (a replay, a skip) is a 409."""
        control = await start_control()
        before = Snapshot_.of(fleet)
        for version in (1, 3):
            push = fleet.sign_push(
                {"models/m/1/model.gguf": (b"m" * 10, _custom("m", "1"))}, version=version
            )
            status, body = await upload(control, push)
            assert status == 409
            assert body["error"]["code"] == "wrong_targets_version"
        await assert_unchanged(control, fleet, before)

    async def test_a_blob_whose_hash_differs_publishes_nothing(
        self, start_control: StartControl, fleet: Fleet
    ):
        """A blob that does not hash to the sha256 it is uploaded as is refused (422)."""
        control = await start_control()
        before = Snapshot_.of(fleet)
        push = fleet.gguf_push("m", "1")
        (digest,) = push.blobs
        swapped = Push(push.targets, {digest: b"something else entirely"}, push.paths)
        status, body = await upload(control, swapped)
        assert status == 422
        assert body["error"]["code"] == "blob_mismatch"
        await assert_unchanged(control, fleet, before)
        # Uploaded under another name, the wrong bytes are simply not the blob the target needs.
        status, body = await upload(control, swapped, names={digest: "blob"})
        assert status == 400
        assert body["error"]["code"] in ("missing_blob", "unexpected_blob")
        await assert_unchanged(control, fleet, before)

    async def test_a_push_that_is_not_multipart_or_not_metadata_is_a_400(
        self, start_control: StartControl, fleet: Fleet
    ):
        """A JSON body, or a targets part that is not TUF metadata, is refused clearly."""
        control = await start_control()
        status, body = await control.call("POST", "/api/v1/models", json={"targets": {}})
        assert status == 400
        assert body["error"]["code"] == "malformed_targets"
        status, body = await upload(control, Push(b"not json", {}, []))
        assert status == 400
        assert body["error"]["code"] == "malformed_targets"

    async def test_a_published_version_never_changes(
        self, start_control: StartControl, fleet: Fleet
    ):
        """Pushing other bytes under a published path is a 409; the first push stands."""
        control = await start_control()
        assert (await upload(control, fleet.gguf_push("m", "1")))[0] == 201
        before = Snapshot_.of(fleet)
        status, body = await upload(control, fleet.gguf_push("m", "1", data=b"other" * 10))
        assert status == 409
        assert body["error"]["code"] == "immutable_target"
        assert Snapshot_.of(fleet).timestamp == before.timestamp


class TestRefresh:
    async def test_snapshot_and_timestamp_are_resigned_before_they_expire(
        self, start_control: StartControl, fleet: Fleet
    ):
        """With a horizon past their expiry, both online roles are re-signed and still verify."""
        control = await start_control()
        service = control.service
        assert service.store is not None
        from edgelm_control.repository.service import RepositoryService

        repository = RepositoryService(
            fleet.repository_dir,
            fleet.control_dir / "keys",
            service.store,
            control.clock,
            _noop_announce,
        )
        version = await repository.refresh(before_s=60 * 86400)
        assert version == 2
        assert await repository.refresh(before_s=60) is None
        metadata = fleet.repository_dir / "metadata"
        root = Metadata[Root].from_file(str(metadata / "1.root.json"))
        timestamp = Metadata[Timestamp].from_file(str(metadata / "timestamp.json"))
        root.verify_delegate(Timestamp.type, timestamp)
        snapshot = Metadata[Snapshot].from_file(
            str(metadata / f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
        )
        root.verify_delegate(Snapshot.type, snapshot)
        assert isinstance(fleet.current_targets().signed, Targets)


async def _noop_announce(version: int) -> None:
    return None


def _custom(name: str, version: str) -> dict[str, Any]:
    from tests.integration.control.fleet import gguf_custom

    return gguf_custom(name, version)
