"""Key rotation through ``POST /api/v1/repository/root``, on a running control plane.

The operator's side is the real rotation core (root N + 1 signed with the fleet's offline
keys from the fleet directory); the control plane, its HTTP server, its files and the broker
are real, and python-tuf's ngclient reads the result as a device would. A refused root must
leave the repository exactly as it was: same timestamp, same files.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, Root, Targets, Timestamp
from tuf.ngclient import Updater

from edgelm_control.repository.director_keys import DirectorKeyring
from edgelm_control.repository.service import RepositoryService
from edgelm_control.store.desired import get_desired
from edgelm_control.store.models import repository_versions
from edgelm_protocol import (
    Announce,
    DesiredDocument,
    DesiredStateRefused,
    DirectorKeys,
    Topic,
    decode,
    key_id,
    verify_desired,
)
from edgelm_protocol.mqtt import MqttClient, MqttSettings
from edgelm_protocol.repository import RepositoryWriter, generate_key, load_key
from edgelm_provisioning.key_rotation import next_root, resign_targets, sign_root
from tests.integration.control.conftest import Running, StartControl, until
from tests.integration.control.fleet import Fleet, gguf_custom
from tests.integration.control.test_repository import Snapshot_, form
from tests.integration.control.test_rollouts import create, known, push


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def current_root(fleet: Fleet) -> Metadata[Root]:
    metadata = fleet.repository_dir / "metadata"
    newest = max(int(p.name.split(".")[0]) for p in metadata.glob("*.root.json"))
    return Metadata[Root].from_file(str(metadata / f"{newest}.root.json"))


def root_key(fleet: Fleet) -> Signer:
    return load_key(fleet.offline_keys / "root-0.pem")


def public_pem(key_file: Path) -> str:
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def publish(
    control: Running, root: Metadata[Root], targets: Metadata[Targets] | None = None
) -> tuple[int, Any]:
    body = {"root": root.to_dict(), "targets": None if targets is None else targets.to_dict()}
    return await control.call("POST", "/api/v1/repository/root", json=body)


def walk(control: Running, anchor: bytes, where: Path) -> Updater:
    """A device's python-tuf client, from ``anchor``, refreshed against the control plane."""
    where.mkdir(parents=True, exist_ok=True)
    updater = Updater(
        bootstrap=anchor,
        metadata_dir=str(where),
        metadata_base_url=f"{control.url}/repository/metadata/",
    )
    updater.refresh()
    return updater


def trusted_root_version(where: Path) -> int:
    return int(Metadata[Root].from_file(str(where / "root.json")).signed.version)


class TestRootRotation:
    async def test_a_new_root_is_published_announced_and_walked_by_a_device(
        self, start_control: StartControl, fleet: Fleet, tmp_path: Path
    ):
        """Root v2 with a new root key, signed by the old and the new: stored as 2.root.json,
        a new timestamp announced on MQTT, and ngclient from root v1 walks to it."""
        control = await start_control()
        anchor = (fleet.repository_dir / "metadata" / "1.root.json").read_bytes()
        announced: list[int] = []
        watcher = MqttClient(
            MqttSettings(host="127.0.0.1", port=control.port, client_id="w", clean_start=True)
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
        try:
            new_key = generate_key(fleet.offline_keys / "root-1.pem")
            current = current_root(fleet)
            new = next_root(current.signed, Root.type, now=now(), tuf_keys=[new_key.public_key])
            status, body = await publish(control, sign_root(new, [root_key(fleet), new_key]))
            assert status == 201, body
            assert body["root_version"] == 2
            assert body["targets_resigned"] is False
            assert (fleet.repository_dir / "metadata" / "2.root.json").is_file()
            await until(lambda: body["timestamp_version"] in announced)
        finally:
            watching.cancel()
            await watcher.stop()
        client = tmp_path / "device"
        await asyncio.to_thread(walk, control, anchor, client)
        assert trusted_root_version(client) == 2
        status, served = await control.call("GET", "/repository/metadata/2.root.json", auth=False)
        assert status == 200
        assert served["signed"]["roles"]["root"]["keyids"] == [new_key.public_key.keyid]

    async def test_forged_and_out_of_order_roots_are_refused_and_change_nothing(
        self, start_control: StartControl, fleet: Fleet
    ):
        """An attacker's root, a root signed only by the old keys, one that skips a version
        and one that is not metadata: each a clear 4xx, the repository untouched."""
        control = await start_control()
        before = Snapshot_.of(fleet)
        current = current_root(fleet).signed
        attacker = generate_key(fleet.root / "attacker-0.pem")
        new_key = generate_key(fleet.offline_keys / "root-1.pem")
        rotated = next_root(current, Root.type, now=now(), tuf_keys=[new_key.public_key])
        skipped = next_root(current, Targets.type, now=now(), tuf_keys=[new_key.public_key])
        skipped.version = 3
        cases = [
            (sign_root(rotated, [attacker]), 422, "forged_root"),
            (sign_root(rotated, [root_key(fleet)]), 422, "forged_root"),
            (sign_root(skipped, [root_key(fleet)]), 409, "wrong_root_version"),
        ]
        for root, status_code, code in cases:
            status, body = await publish(control, root)
            assert (status, body["error"]["code"]) == (status_code, code), body
            assert body["error"]["param"] == "root"
        status, body = await control.call(
            "POST", "/api/v1/repository/root", json={"root": {"signed": {}}}
        )
        assert (status, body["error"]["code"]) == (400, "malformed_root")
        status, body = await control.call("POST", "/api/v1/repository/root", json=["x"])
        assert status == 400
        status, body = await control.call(
            "POST", "/api/v1/repository/root", json=cases[0][0].to_dict(), auth=False
        )
        assert (status, body["error"]["code"]) == (401, "invalid_token")
        after = Snapshot_.of(fleet)
        assert (after.timestamp, after.files) == (before.timestamp, before.files)


class TestTargetsRotation:
    async def test_after_a_targets_rotation_only_the_new_key_publishes_models(
        self, start_control: StartControl, fleet: Fleet, tmp_path: Path
    ):
        """Without re-signed targets the rotation is refused (409, nothing changes); with
        them it is published; then a push signed by the rotated-out key is a 422, and one
        signed by the new key is published and verifies on a device."""
        control = await start_control()
        await push(control, "tiny", "1.0")
        current = current_root(fleet)
        new_key = generate_key(fleet.offline_keys / "targets-1.pem")
        new = next_root(current.signed, Targets.type, now=now(), tuf_keys=[new_key.public_key])
        root = sign_root(new, [root_key(fleet)])
        before = Snapshot_.of(fleet)
        status, body = await publish(control, root)
        assert (status, body["error"]["code"]) == (409, "targets_not_resigned"), body
        after = Snapshot_.of(fleet)
        assert (after.timestamp, after.files) == (before.timestamp, before.files)

        published = fleet.current_targets()
        by_old = resign_targets(published, [load_key(fleet.offline_keys / "targets-0.pem")],
                                now=now())  # fmt: skip
        status, body = await publish(control, root, by_old)
        assert (status, body["error"]["code"]) == (422, "forged_targets"), body

        status, body = await publish(control, root, resign_targets(published, [new_key], now=now()))
        assert status == 201, body
        assert (body["targets_resigned"], body["targets_version"]) == (
            True,
            published.signed.version + 1,
        )
        status, models = await control.call("GET", "/api/v1/models")
        assert [m["model"] for m in models["data"]] == ["tiny@1.0"]

        old_push = fleet.gguf_push("tiny", "2.0")  # sign_push signs with targets-0.pem
        status, body = await control.call("POST", "/api/v1/models", data=form(old_push))
        assert (status, body["error"]["code"]) == (422, "forged_targets"), body
        new_push = fleet.sign_push(
            {"models/tiny/2.0/model.gguf": (b"GGUF two " * 64, gguf_custom("tiny", "2.0"))},
            signer=new_key,
        )
        status, body = await control.call("POST", "/api/v1/models", data=form(new_push))
        assert status == 201, body

        client = tmp_path / "device"
        anchor = (fleet.repository_dir / "metadata" / "1.root.json").read_bytes()
        updater = await asyncio.to_thread(walk, control, anchor, client)
        assert await asyncio.to_thread(updater.get_targetinfo, "models/tiny/2.0/model.gguf")


class TestDirectorRotation:
    async def test_the_director_moves_to_the_key_the_root_names_and_re_signs_current_states(
        self, start_control: StartControl, fleet: Fleet
    ):
        """A root naming a key the server lacks is refused; once the key is in keys_dir the
        root is published, and every current desired state is signed again with the new key
        (which the old key's holders cannot verify), the new one only."""
        control = await start_control()
        await push(control, "m", "1")
        device = await control.device("a-1")
        await known(control, "a-1")
        await create(control, model="m@1", selector={"all": True}, waves="rest")
        await until(lambda: len(device.desired) == 1)
        first = device.desired[0]

        key_file = fleet.root / "director-1.pem"  # made by the operator, not yet on the server
        generate_key(key_file)
        new = next_root(
            current_root(fleet).signed, "director", now=now(), director_pems=[public_pem(key_file)]
        )
        root = sign_root(new, [root_key(fleet)])
        status, body = await publish(control, root)
        assert (status, body["error"]["code"]) == (409, "missing_online_key"), body

        (fleet.control_dir / "keys" / "director-1.pem").write_bytes(key_file.read_bytes())
        new_keys = DirectorKeys.from_pem([public_pem(key_file).encode()])
        old_keys = device.keys
        device.keys = new_keys  # a device that has walked to the new root
        status, body = await publish(control, root)
        assert status == 201, body
        assert body["director_keys"] == sorted(new_keys.keyids)
        await until(lambda: len(device.desired) == 2)
        again = device.desired[1]
        assert again.sequence > first.sequence
        assert again.target == first.target

        store = control.service.store
        assert store is not None
        async with store.read() as conn:
            record = await get_desired(conn, "a-1")
        assert record is not None
        assert record.sequence == again.sequence
        document = DesiredDocument.from_json(json.loads(record.document or "")["body"])
        # A device that still trusts only the old key cannot verify what is signed now.
        with pytest.raises(DesiredStateRefused) as refused:
            verify_desired(
                document,
                keys=old_keys,
                fleet=fleet.name,
                device="a-1",
                last_applied=0,
                now=int(now().timestamp()),
            )
        assert refused.value.code == "forged_desired_state"


class KilledBeforeTheTimestamp(RepositoryWriter):
    """A writer whose process dies after ``N+1.root.json`` and before ``timestamp.json``."""

    def write_signed(self, role: str) -> None:
        if role == Timestamp.type:
            raise RuntimeError("killed")
        super().write_signed(role)


class TestInterruptedRotation:
    async def test_a_rotation_cut_short_before_the_timestamp_is_finished_at_start(
        self, start_control: StartControl, fleet: Fleet, tmp_path: Path
    ):
        """Root v2 (new targets key) and the re-signed targets were written, the timestamp
        was not: the published targets no longer verify under the newest root. The control
        plane finishes the rotation when it starts, and a device walks to a consistent
        repository."""
        writer = KilledBeforeTheTimestamp.open(fleet.repository_dir, fleet.control_dir / "keys")
        new_key = generate_key(fleet.offline_keys / "targets-1.pem")
        new = next_root(
            writer.md[Root.type].signed, Targets.type, now=now(), tuf_keys=[new_key.public_key]
        )
        resigned = resign_targets(writer.md[Targets.type], [new_key], now=now())
        with pytest.raises(RuntimeError, match="killed"):
            writer.accept_root(sign_root(new, [root_key(fleet)]), resigned)
        assert (fleet.repository_dir / "metadata" / "2.root.json").is_file()
        assert fleet.current_targets().signed.version == 1  # what the timestamp still names
        control = await start_control()
        assert fleet.current_targets().signed.version == resigned.signed.version
        anchor = (fleet.repository_dir / "metadata" / "1.root.json").read_bytes()
        await asyncio.to_thread(walk, control, anchor, tmp_path / "device")
        assert trusted_root_version(tmp_path / "device") == 2


class FailsAfterTheFiles(RepositoryWriter):
    """A writer that writes every file of a rotation, then fails: the store's transaction
    around it rolls back, as a commit that fails after the files would."""

    def accept_root(self, root: Metadata[Root], targets: Metadata[Targets] | None = None) -> None:
        super().accept_root(root, targets)
        raise RuntimeError("the commit failed")


class FaultyRepository(RepositoryService):
    """The control plane's repository service, whose next rotation writes through ``fault``
    (every other opening of the repository is the real writer)."""

    def __init__(self, fleet: Fleet, control: Running, fault: type[RepositoryWriter]) -> None:
        store = control.service.store
        assert store is not None
        keys, metadata = fleet.control_dir / "keys", fleet.repository_dir / "metadata"
        super().__init__(
            fleet.repository_dir,
            keys,
            store,
            control.clock,
            self._announced,
            director_keys=DirectorKeyring(keys, metadata),
        )
        self.fault: type[RepositoryWriter] | None = fault
        self.announced: list[int] = []

    async def _announced(self, version: int) -> None:
        self.announced.append(version)

    def _open(self) -> RepositoryWriter:
        fault, self.fault = self.fault, None
        if fault is None:
            return super()._open()
        return fault.open(self.repository_dir, self.keys_dir)


class TestRotationFailingPartWay:
    @pytest.mark.parametrize(
        ("role", "fault"),
        [
            ("director", KilledBeforeTheTimestamp),
            (Targets.type, KilledBeforeTheTimestamp),
            (Targets.type, FailsAfterTheFiles),
        ],
    )
    async def test_it_is_repaired_announced_and_re_signed_before_the_error_returns(
        self,
        start_control: StartControl,
        fleet: Fleet,
        tmp_path: Path,
        role: str,
        fault: type[RepositoryWriter],
    ):
        """A rotation that raises after N+1.root.json (the timestamp cannot be written, or
        the store's commit fails after the files) still raises, but leaves a repository a
        device walks to v2, a model index at the files' versions, the new root announced,
        and (for a director rotation) current states re-signed with the new key."""
        control = await start_control()
        await push(control, "m", "1")
        device = await control.device("a-1")
        await known(control, "a-1")
        await create(control, model="m@1", selector={"all": True}, waves="rest")
        await until(lambda: len(device.desired) == 1)
        repository = FaultyRepository(fleet, control, fault)
        director = control.service.director
        assert director is not None
        repository.when_root_published("director", director.resign_other_keys)
        current = current_root(fleet).signed
        targets = None
        if role == "director":
            key_file = fleet.control_dir / "keys" / "director-1.pem"
            generate_key(key_file)
            new = next_root(current, role, now=now(), director_pems=[public_pem(key_file)])
            device.keys = DirectorKeys.from_pem([public_pem(key_file).encode()])
        else:
            new_key = generate_key(fleet.offline_keys / "targets-1.pem")
            new = next_root(current, role, now=now(), tuf_keys=[new_key.public_key])
            targets = resign_targets(fleet.current_targets(), [new_key], now=now()).to_bytes()

        with pytest.raises(RuntimeError):
            await repository.accept_root(sign_root(new, [root_key(fleet)]).to_bytes(), targets)

        assert repository.announced == [fleet.timestamp_version()]
        anchor = (fleet.repository_dir / "metadata" / "1.root.json").read_bytes()
        await asyncio.to_thread(walk, control, anchor, tmp_path / "device")
        assert trusted_root_version(tmp_path / "device") == 2
        store = control.service.store
        assert store is not None
        async with store.read() as conn:
            versions = await repository_versions(conn)
        assert versions is not None
        assert (versions.targets_version, versions.timestamp_version) == (
            fleet.current_targets().signed.version,
            fleet.timestamp_version(),
        )
        if role == "director":
            await until(lambda: len(device.desired) == 2)  # verified with the new key only


class TestStartAfterARotation:
    async def test_states_are_re_signed_at_start_even_when_maintenance_fails(
        self, start_control: StartControl, fleet: Fleet
    ):
        """Root v2 naming a new director key was published by a control plane that died
        before re-signing. At the next start maintenance fails (the store refuses to prune
        telemetry); the current state is re-signed with the new key all the same."""
        control = await start_control()
        await push(control, "m", "1")
        device = await control.device("a-1")
        await known(control, "a-1")
        await create(control, model="m@1", selector={"all": True}, waves="rest")
        await until(lambda: len(device.desired) == 1)
        await control.stop()
        key_file = fleet.control_dir / "keys" / "director-1.pem"
        generate_key(key_file)
        writer = RepositoryWriter.open(fleet.repository_dir, fleet.control_dir / "keys")
        new = next_root(
            writer.md[Root.type].signed, "director", now=now(), director_pems=[public_pem(key_file)]
        )
        writer.accept_root(sign_root(new, [root_key(fleet)]))  # and killed before its hooks
        with contextlib.closing(sqlite3.connect(fleet.control_dir / "control.db")) as db, db:
            db.execute(
                "INSERT INTO telemetry (device_id, received_ms, sent_ms, window_s, requests,"
                " errors, queue_depth) VALUES ('a-1', 1, 1, 60, 0, 0, 0)"
            )
            db.execute(
                "CREATE TRIGGER refuse_prune BEFORE DELETE ON telemetry"
                " BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
            )

        control = await start_control()

        store = control.service.store
        assert store is not None
        async with store.read() as conn:
            record = await get_desired(conn, "a-1")
        assert record is not None
        signers = {s["keyid"] for s in json.loads(record.document or "")["body"]["signatures"]}
        assert signers == {key_id(_private(key_file).public_key())}
        with contextlib.closing(sqlite3.connect(fleet.control_dir / "control.db")) as db:
            assert db.execute("SELECT count(*) FROM telemetry").fetchone() == (1,)  # it failed


def _private(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key
