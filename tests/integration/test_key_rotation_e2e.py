"""Key rotation across the whole fleet, every part real: `edgelm provision rotate-keys` and
`edgelm fleet keys publish` on the fleet directory, `edgelm control run`, a Mosquitto, and
enrolled agents as subprocesses on the tiny GGUF.

What each test shows: a rotated root reaches a connected device through sync; a device
offline through two rotations walks 1 -> 2 -> 3 when it returns; a rotated-out targets key
signs nothing a device installs; after a director rotation devices take desired states from
the new key, refuse the old key's, and learn no key from a message on the broker; a device
learns the new key from a root even when the rest of the refresh is blocked; and a flood of
states signed by unknown keys costs one refresh per ``sync_key_refresh_interval_s``, while
the director's real new key still gets through.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import Signer
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from edgelm_protocol import DesiredDocument, TargetRef
from edgelm_protocol.repository import generate_key, load_key
from edgelm_protocol.topics import Channel
from edgelm_provisioning.key_rotation import next_root, resign_targets, sign_root
from tests.agent_process import AgentProcess
from tests.fleet_harness import Director, Model, Repository, counterpart, enrolled_agent
from tests.integration.control.fleet import gguf_custom, sha256
from tests.integration.test_fleet_e2e import FullFleet
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.timeout(600)


class RotatingFleet(FullFleet):
    """A :class:`FullFleet` whose agents refresh at once when the repository is announced."""

    def start_agent(self, device: str) -> AgentProcess:
        agent = AgentProcess(
            self.root / device,
            model=None,
            env={
                "EDGELM_TELEMETRY_INTERVAL_S": "2",
                "EDGELM_SYNC_REFRESH_JITTER_S": "0",
                "EDGELM_SYNC_KEY_REFRESH_INTERVAL_S": "1",
            },
        ).wait_alive()
        self.agents[device] = agent
        return agent

    def rotate(self, role: str) -> dict[str, Any]:
        out = self.run_cli(
            "provision", "rotate-keys", "--role", role, "--fleet-dir", str(self.dir), "--json"
        )
        rotated: dict[str, Any] = json.loads(out)
        return rotated

    def publish_keys(self) -> dict[str, Any]:
        published: dict[str, Any] = self.fleet("keys", "publish")
        return published

    def device_roots(self, device: str) -> list[int]:
        """The root versions the device's ngclient verified, in its metadata cache."""
        history = self.root / device / "state" / "registry" / "metadata" / "root_history"
        return sorted(int(p.name.split(".")[0]) for p in history.glob("*.root.json"))

    def learned_keys(self, device: str) -> dict[str, Any] | None:
        path = self.root / device / "state" / "fleet" / "director-keys.json"
        if not path.exists():
            return None
        learned: dict[str, Any] = json.loads(path.read_text())
        return learned


@pytest.fixture
def rotating_fleet(
    short_tmp: Path, mosquitto_factory: Callable[..., Mosquitto]
) -> Iterator[RotatingFleet]:
    broker = mosquitto_factory(persistence=True)
    fleet = RotatingFleet(short_tmp, broker)
    try:
        yield fleet
    finally:
        fleet.stop_all()


class TestRootRotation:
    def test_a_connected_device_gets_a_rotated_root_through_sync(
        self, rotating_fleet: RotatingFleet
    ):
        """rotate-keys --role root then keys publish: the control plane announces, the device
        refreshes and walks to root v2 by itself, and a model pushed afterwards still rolls
        out to it. The old root key is kept on disk; new bundles carry root v2."""
        fleet = rotating_fleet
        fleet.add_device("kiosk-1")
        assert fleet.device_roots("kiosk-1") == [1]
        rotated = fleet.rotate("root")
        assert rotated["root_version"] == 2
        assert (fleet.dir / "keys" / "root-0.pem").exists()
        assert (fleet.dir / "keys" / "root-1.pem").exists()
        published = fleet.publish_keys()
        assert published["root_version"] == 2
        fleet.wait_for(lambda: fleet.device_roots("kiosk-1") == [1, 2], "kiosk-1 to walk to v2")
        bundle_root = Metadata[Root].from_file(str(fleet.dir / "root.json"))
        assert bundle_root.signed.version == 2
        fleet.push("tiny", "1.0")
        fleet.wait_rollout(fleet.rollout("tiny@1.0", waves="1"), "completed")
        assert fleet.serves("kiosk-1") == "tiny"

    def test_a_device_offline_through_two_rotations_walks_the_chain(
        self, rotating_fleet: RotatingFleet
    ):
        """kiosk-2 is away while the root key and then the targets key rotate (roots v2, v3);
        a model signed by the new targets key rolls out. Back online, kiosk-2 walks 1 -> 2 ->
        3 and installs the model; the rotated-out targets key is refused by the control
        plane."""
        fleet = rotating_fleet
        fleet.add_device("kiosk-1")
        fleet.add_device("kiosk-2")
        fleet.agents.pop("kiosk-2").stop()
        fleet.wait_for(lambda: fleet.presence("kiosk-2") == "offline", "kiosk-2 offline")
        assert fleet.rotate("root")["root_version"] == 2
        assert fleet.rotate("targets")["root_version"] == 3
        published = fleet.publish_keys()
        assert [p["root_version"] for p in published["published"]] == [2, 3]
        assert [p["targets_resigned"] for p in published["published"]] == [False, True]
        fleet.push("tiny", "1.0")  # signed with keys/targets-1.pem, the key root v3 lists
        rollout = fleet.rollout("tiny@1.0", waves="1,rest")
        fleet.wait_for(lambda: fleet.states(rollout)["kiosk-1"] == "succeeded", "kiosk-1")
        assert fleet.device_roots("kiosk-2") == [1]
        fleet.start_agent("kiosk-2")
        fleet.wait_for(lambda: fleet.states(rollout)["kiosk-2"] == "succeeded", "kiosk-2 back")
        assert fleet.device_roots("kiosk-2") == [1, 2, 3]
        assert fleet.serves("kiosk-2") == "tiny"
        # The control plane refuses what the rotated-out key signs.
        assert _push_signed_by(fleet, fleet.dir / "keys" / "targets-0.pem") == 422


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310  # a test's own URL
        return json.loads(response.read())


def _push_signed_by(fleet: FullFleet, key_file: Path) -> int:
    """POST a new model whose targets metadata only ``key_file`` signed; the HTTP status."""
    base = f"{fleet.control_url}/repository/metadata"
    snapshot = _get_json(f"{base}/timestamp.json")["signed"]["meta"]["snapshot.json"]["version"]
    version = _get_json(f"{base}/{snapshot}.snapshot.json")["signed"]["meta"]["targets.json"]
    current = Metadata[Targets].from_dict(_get_json(f"{base}/{version['version']}.targets.json"))
    key = load_key(key_file)
    new = resign_targets(current, [key], now=_utcnow())
    data = b"GGUF old key " * 64
    path = "models/evil/1.0/model.gguf"
    new.signed.targets[path] = TargetFile(
        len(data), {"sha256": sha256(data)}, path, {"custom": gguf_custom("evil", "1.0")}
    )
    new.signatures.clear()
    new.sign(key)
    token = (fleet.dir / "operator-token").read_text().strip()

    async def post() -> int:
        form = aiohttp.FormData()
        form.add_field("targets", new.to_bytes(), filename="targets.json")
        form.add_field(sha256(data), data, filename=sha256(data))
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{fleet.control_url}/api/v1/models",
                data=form,
                headers={"Authorization": f"Bearer {token}"},
            ) as response,
        ):
            return response.status

    return asyncio.run(post())


class TestTargetsKeyOnTheDevice:
    async def test_a_device_refuses_targets_signed_by_a_rotated_out_key(
        self, short_tmp: Path, mosquitto: Mosquitto
    ):
        """A repository whose root v2 rotated the targets key, then listed a model signed by
        the old key (a stolen key, or a repository that ignores the rotation): the device
        installs a model the new key signed, and refuses the other as a signature failure,
        though a valid desired state names it."""
        repository = Repository(short_tmp)
        director = Director()
        old_key = load_key(short_tmp / "repo-keys" / "targets-0.pem")
        new_key = generate_key(short_tmp / "repo-keys" / "targets-1.pem")
        repository.serve()
        agent = enrolled_agent(short_tmp / "dev", "kiosk-1", repository, director, mosquitto.port)
        try:
            writer = repository.writer
            new = next_root(writer.md[Root.type].signed, Targets.type, now=_utcnow(),
                            tuf_keys=[new_key.public_key])  # fmt: skip
            root_key = load_key(short_tmp / "repo-keys" / "root-0.pem")
            writer.held[Targets.type].append(new_key)
            writer.accept_root(
                sign_root(new, [root_key]),
                resign_targets(writer.md[Targets.type], [new_key], now=_utcnow()),
            )
            good = repository.add("good", "1.0")  # signed by the key root v2 lists
            async with counterpart(mosquitto.port) as side:
                await side.desired("kiosk-1", director.sign("kiosk-1", good.target()))
                await side.wait_for(
                    lambda: any(e.kind.value == "activated" for e in side.events("kiosk-1")),
                    "the model the new key signed to be activated",
                )
                bad = _add_signed_by(repository, "bad", "1.0", old_key)
                await side.desired("kiosk-1", director.sign("kiosk-1", bad.target()))
                failed = await side.wait_for(
                    lambda: [e for e in side.events("kiosk-1") if e.kind.value == "install_failed"],
                    "the model the old key signed to be refused",
                )
            assert "signature" in (failed[0].reason or "")
            status, registry = agent.request("GET", "/v1/registry/models")
            assert status == 200
            assert registry["active"] == "good@1.0"
            assert "bad@1.0" not in json.dumps(registry)
        finally:
            agent.stop()
            repository.stop()


def _add_signed_by(repository: Repository, name: str, version: str, key: Signer) -> Model:
    """Add a model to the repository with targets metadata signed by ``key`` alone."""
    writer = repository.writer
    targets_signers = writer.signers[Targets.type]
    writer.signers[Targets.type] = [key]
    try:
        return repository.add(name, version)
    finally:
        writer.signers[Targets.type] = targets_signers


class TestDirectorRotation:
    async def test_devices_move_to_the_new_director_key_and_learn_none_from_messages(
        self, rotating_fleet: RotatingFleet
    ):
        """After rotate-keys --role director and keys publish, the device learns the new key
        from root v2 (persisted), takes the re-signed state and a new rollout from it; a
        state signed by the old key, and one signed by a key an attacker announces in an
        unsigned message, are refused, and the attacker's key is never learned."""
        fleet = rotating_fleet
        fleet.add_device("kiosk-1")
        fleet.push("tiny", "1.0")
        fleet.wait_rollout(fleet.rollout("tiny@1.0", waves="1"), "completed")
        assert fleet.learned_keys("kiosk-1") is None
        rotated = fleet.rotate("director")
        assert rotated["new_keys"] == [str(fleet.dir / "control" / "keys" / "director-1.pem")]
        fleet.publish_keys()
        learned = fleet.wait_for(lambda: fleet.learned_keys("kiosk-1"), "the new director key")
        assert learned["root_version"] == 2
        new_pem = _public_pem(fleet.dir / "control" / "keys" / "director-1.pem")
        assert learned["keys"] == [new_pem]
        bundle = fleet.root / "kiosk-9.json"  # a device enrolled from now on starts with it
        fleet.run_cli("provision", "device", "kiosk-9", "--fleet-dir", str(fleet.dir),
                      "--class", "x86", "--out", str(bundle), "--json")  # fmt: skip
        issued = json.loads(bundle.read_text())
        assert (issued["director_keys"], issued["root"]["signed"]["version"]) == ([new_pem], 2)

        fleet.push("tiny", "2.0")
        fleet.wait_rollout(fleet.rollout("tiny@2.0", waves="1"), "completed")
        agent = fleet.agents["kiosk-1"]
        _status, registry = agent.request("GET", "/v1/registry/models")
        assert registry["active"] == "tiny@2.0"

        old_director = Director(_private(fleet.dir / "control" / "keys" / "director.pem"))
        attacker = Director(Ed25519PrivateKey.generate())
        target = _target(registry, "tiny@1.0")
        asked, refused = len(agent.log_events("desired_key_unknown")), len(_forged(agent))
        async with counterpart(fleet.broker.port) as side:
            for n, signer in enumerate((old_director, attacker)):
                document = signer.sign("kiosk-1", target, sequence=10_000 + n, rollout="ro-evil")
                # The attacker's "key announcement": the key beside a desired state, unsigned.
                await side.send_raw(
                    side.topic("kiosk-1", Channel.DESIRED),
                    _with_key(document, signer.public_pem(), message_id=f"{n + 1:032x}"),
                )
                await side.send("kiosk-1", Channel.DESIRED, document)
                # One at a time: a second one waiting beside it would replace it (latest wins).
                await side.wait_for(_refusals(agent, refused + n + 1), "it to be refused")
        # One refresh for each unknown key, then refused: nothing is learned from the broker.
        assert len(agent.log_events("desired_key_unknown")) == asked + 2
        assert fleet.learned_keys("kiosk-1") == learned
        _status, registry = agent.request("GET", "/v1/registry/models")
        assert registry["active"] == "tiny@2.0"


def _rotate_director(repository: Repository, workdir: Path, new: Director) -> None:
    """Root v2 of the harness's repository names ``new`` as the director."""
    writer = repository.writer
    root = next_root(writer.md[Root.type].signed, "director", now=_utcnow(),
                     director_pems=[new.public_pem()])  # fmt: skip
    writer.accept_root(sign_root(root, [load_key(workdir / "repo-keys" / "root-0.pem")]))


def _refreshes(agent: AgentProcess) -> int:
    """Metadata refreshes the agent finished, whatever their outcome."""
    return len(agent.log_events("repository_refreshed")) + len(
        agent.log_events("repository_refresh_failed")
    )


class TestDirectorKeysOnTheDevice:
    async def test_a_root_is_learned_though_the_rest_of_the_refresh_is_blocked(
        self, short_tmp: Path, mosquitto: Mosquitto
    ):
        """Root v2 names a new director key and the repository's timestamp is withheld (a
        network that lets roots through): the refresh fails, yet the device learns the key
        from the root python-tuf verified and takes the new director's state."""
        repository = Repository(short_tmp)
        old, new = Director(), Director()
        repository.serve()
        agent = enrolled_agent(short_tmp / "dev", "kiosk-1", repository, old, mosquitto.port)
        try:
            _rotate_director(repository, short_tmp, new)
            timestamp = repository.root / "metadata" / "timestamp.json"
            timestamp.rename(timestamp.with_name("withheld.json"))
            async with counterpart(mosquitto.port) as side:
                await side.desired("kiosk-1", new.sign("kiosk-1", None, rollout="ro-1"))
                await side.wait_for(
                    lambda: agent.log_events("desired_state_release") or _forged(agent),
                    "the new director's state to be taken or refused",
                )
            assert not _forged(agent)
            assert agent.log_events("repository_refresh_failed")
            [learned] = agent.log_events("director_keys_learned")
            assert learned["root_version"] == 2
        finally:
            agent.stop()
            repository.stop()

    async def test_a_flood_of_unknown_keys_costs_one_refresh_per_interval(
        self, short_tmp: Path, mosquitto: Mosquitto
    ):
        """States signed by an attacker's keys, one then twenty more: the first gets its one
        refresh and is refused; of the rest only the newest waits (the interval, an hour
        here, has not passed), the others are dropped, and no refresh or report follows."""
        repository = Repository(short_tmp)
        director, attacker = Director(), Director()
        repository.serve()
        hour = {"EDGELM_SYNC_KEY_REFRESH_INTERVAL_S": "3600"}
        agent = enrolled_agent(
            short_tmp / "dev", "kiosk-1", repository, director, mosquitto.port, env=hour
        )
        try:
            async with counterpart(mosquitto.port) as side:
                await side.desired("kiosk-1", attacker.sign("kiosk-1", None, sequence=1))
                await side.wait_for(lambda: _forged(agent), "the first to be refused")
                refreshes = _refreshes(agent)
                for sequence in range(2, 22):
                    await side.desired("kiosk-1", attacker.sign("kiosk-1", None, sequence=sequence))
                dropped = await side.wait_for(
                    lambda: (
                        len(agent.log_events("desired_key_refresh_dropped")) >= 19
                        or len(_forged(agent)) > 1
                    ),
                    "the states that came after the first to be dropped",
                )
            assert len(_forged(agent)) == 1, "a second refresh ran within the interval"
            assert dropped
            assert len(agent.log_events("desired_key_unknown")) == 21
            assert len(agent.log_events("desired_key_refresh_dropped")) == 19
            assert agent.log_events("desired_key_refresh_deferred")
            assert _refreshes(agent) == refreshes
        finally:
            agent.stop()
            repository.stop()

    async def test_the_new_director_key_gets_through_a_flood(
        self, short_tmp: Path, mosquitto: Mosquitto
    ):
        """After an attacker's state took a refresh, the director rotates its key; the new
        director's state, sent behind more of the attacker's, waits for the interval and its
        own refresh, and is taken."""
        repository = Repository(short_tmp)
        old, new, attacker = Director(), Director(), Director()
        repository.serve()
        agent = enrolled_agent(short_tmp / "dev", "kiosk-1", repository, old, mosquitto.port,
                               env={"EDGELM_SYNC_KEY_REFRESH_INTERVAL_S": "1"})  # fmt: skip
        try:
            async with counterpart(mosquitto.port) as side:
                await side.desired("kiosk-1", attacker.sign("kiosk-1", None, sequence=1))
                await side.wait_for(lambda: _forged(agent), "the attacker's state to be refused")
                _rotate_director(repository, short_tmp, new)
                for sequence in range(2, 7):
                    await side.desired("kiosk-1", attacker.sign("kiosk-1", None, sequence=sequence))
                await side.desired("kiosk-1", new.sign("kiosk-1", None, sequence=1))
                await side.wait_for(
                    lambda: agent.log_events("desired_state_release"),
                    "the new director's state to be taken",
                )
            [learned] = agent.log_events("director_keys_learned")
            assert learned["root_version"] == 2
        finally:
            agent.stop()
            repository.stop()


def _refusals(agent: AgentProcess, count: int) -> Callable[[], bool]:
    """True once the agent has refused ``count`` forged desired states."""
    return lambda: len(_forged(agent)) >= count


def _forged(agent: AgentProcess) -> list[dict[str, Any]]:
    """The agent's refusals of desired states that no trusted director key signed."""
    return [
        e
        for e in agent.log_events("sync_message_dropped")
        if e.get("code") == "forged_desired_state"
    ]


def _private(path: Path) -> Ed25519PrivateKey:
    key = load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def _public_pem(path: Path) -> str:
    return Director(_private(path)).public_pem()


def _target(registry: dict[str, Any], ref: str) -> TargetRef:
    for model in registry["models"]:
        if model["ref"] == ref:
            return TargetRef(model["path"], model["length"], model["sha256"])
    raise AssertionError(f"{ref} not in {registry}")


def _with_key(document: DesiredDocument, public_pem: str, *, message_id: str) -> bytes:
    """A desired envelope carrying a public key beside the signed part: unsigned, so the
    device must not even read it (it is refused as malformed)."""
    body = document.to_json()
    body["director_keys"] = [public_pem]
    envelope = {"v": 1, "id": message_id, "type": "desired", "from": "control", "ts_ms": 1}
    return json.dumps({**envelope, "body": body}).encode()
