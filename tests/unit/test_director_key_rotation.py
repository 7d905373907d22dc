"""A device learns director keys from verified TUF roots only, and looks once before refusing.

The session (pure) asks for one refresh when a desired state is signed by keys it does not
know; :class:`KeyRefreshGate` (pure) bounds how many such states wait and how often they may
refresh; :class:`DirectorTrust` reads the keys from the root python-tuf's ngclient verified (a
real repository in a folder, walked by :class:`TrustClient`), keeps them across restarts, and
never goes back to a retired key.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from edgelm_agent.enrollment import (
    DIRECTOR_KEYS_FILE,
    Enrollment,
    fleet_dir,
    read_learned_director_keys,
    write_enrollment,
)
from edgelm_agent.registry.clock import LastKnownGoodClock
from edgelm_agent.registry.errors import VerificationError
from edgelm_agent.registry.trust import TrustClient
from edgelm_agent.sync.director_trust import DirectorTrust, KeyRefreshGate
from edgelm_agent.sync.session import (
    AckInbound,
    ApplyDesired,
    Dropped,
    RefreshForKey,
    ReportEvent,
    SyncSession,
)
from edgelm_protocol import (
    DesiredDocument,
    DesiredState,
    DirectorKeys,
    EventKind,
    TargetRef,
    encode,
    new_envelope,
    sign_desired,
)
from edgelm_protocol.repository import RepositoryWriter, load_key
from edgelm_protocol.topics import Channel, Topic
from edgelm_provisioning.key_rotation import next_root, sign_root

FLEET, DEVICE = "acme", "kiosk-1"
NOW = 1_800_000_000
TARGET = TargetRef(path="models/tiny/1.0/model.gguf", length=1234, sha256="ab" * 32)
OLD, NEW = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
TOPIC = Topic.for_device(FLEET, DEVICE, Channel.DESIRED).value


def pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def keyring(*keys: Ed25519PrivateKey) -> DirectorKeys:
    return DirectorKeys([k.public_key() for k in keys])


def desired(sequence: int, key: Ed25519PrivateKey) -> bytes:
    state = DesiredState(
        fleet=FLEET,
        device=DEVICE,
        sequence=sequence,
        issued_at=NOW - 10,
        expires=NOW + 3600,
        rollout="ro-1",
        target=TARGET,
    )
    body = DesiredDocument.from_json(sign_desired(state, key))
    return encode(new_envelope(body, sender="control", ts_ms=NOW * 1000))


def session() -> SyncSession:
    return SyncSession(fleet=FLEET, device=DEVICE, keys=keyring(OLD), agent_version="0.1")


class TestUnknownKey:
    def test_an_unknown_key_asks_for_one_refresh_and_is_not_refused_yet(self):
        """The director's new key, named by a root the device has not walked to: refresh
        first. The message is acknowledged; nothing is applied or reported yet."""
        s = session()
        actions = s.on_message(TOPIC, desired(1, NEW), "t", NOW)
        assert [type(a) for a in actions] == [RefreshForKey, AckInbound]
        ask = actions[0]
        assert isinstance(ask, RefreshForKey)
        assert ask.topic == TOPIC
        assert s.in_progress is None

    def test_after_the_refresh_the_key_the_root_named_verifies(self):
        """Once the refreshed root's keys are in force, the same document is applied."""
        s = session()
        ask = s.on_message(TOPIC, desired(1, NEW), "t", NOW)[0]
        assert isinstance(ask, RefreshForKey)
        s.keys = keyring(NEW)
        [apply] = s.retry_desired(ask.topic, ask.document, NOW)
        assert isinstance(apply, ApplyDesired)
        assert apply.state.sequence == 1

    def test_still_unknown_after_the_refresh_it_is_refused_and_reported_once(self):
        """A key no verified root names (an attacker's) is refused after one look; the retry
        never asks again."""
        s = session()
        attacker = Ed25519PrivateKey.generate()
        ask = s.on_message(TOPIC, desired(1, attacker), "t", NOW)[0]
        assert isinstance(ask, RefreshForKey)
        actions = s.retry_desired(ask.topic, ask.document, NOW)
        assert not any(isinstance(a, RefreshForKey | ApplyDesired) for a in actions)
        [dropped] = [a for a in actions if isinstance(a, Dropped)]
        assert dropped.code == "forged_desired_state"
        [report] = [a for a in actions if isinstance(a, ReportEvent)]
        assert report.kind == EventKind.DESIRED_REJECTED
        assert s.keys.keyids == keyring(OLD).keyids  # nothing learned from the message

    def test_a_bad_signature_by_a_known_key_is_refused_at_once(self):
        """A signature that claims a trusted keyid and does not verify is forged: no refresh
        would change that."""
        data = json.loads(desired(1, NEW))
        data["body"]["signatures"][0]["keyid"] = next(iter(keyring(OLD).keyids))
        actions = session().on_message(TOPIC, json.dumps(data).encode(), "t", NOW)
        assert not any(isinstance(a, RefreshForKey) for a in actions)
        assert any(isinstance(a, Dropped) for a in actions)

    def test_a_newer_state_meanwhile_wins_over_the_retried_one(self):
        """Latest wins across the refresh: the retried older sequence is stale by then."""
        s = session()
        ask = s.on_message(TOPIC, desired(1, NEW), "t", NOW)[0]
        assert isinstance(ask, RefreshForKey)
        s.keys = keyring(NEW)
        [apply, _ack] = s.on_message(TOPIC, desired(2, NEW), "u", NOW)
        assert isinstance(apply, ApplyDesired)
        actions = s.retry_desired(ask.topic, ask.document, NOW)
        assert not any(isinstance(a, ApplyDesired) for a in actions)


class TestKeyRefreshGate:
    def test_only_the_newest_state_waits_and_the_others_are_handed_back_to_drop(self):
        """A flood leaves one state waiting, the last that came; each one it replaced is
        returned, for the shell to log as dropped."""
        gate: KeyRefreshGate[int] = KeyRefreshGate(30)
        dropped = [gate.offer(n, asked=0) for n in range(1000)]
        assert dropped == [None, *range(999)]
        waiting = gate.take()
        assert (waiting.item, waiting.asked) == (999, 0)
        assert gate.peek() is None
        with pytest.raises(RuntimeError):
            gate.take()

    def test_refreshes_for_unknown_keys_start_an_interval_apart(self):
        """The first may start at once; the next only once the interval since the last
        start has passed."""
        gate: KeyRefreshGate[str] = KeyRefreshGate(30)
        assert gate.wait_s(100.0) == 0
        gate.started(100.0)
        assert gate.wait_s(110.0) == 20
        assert gate.wait_s(130.0) == 0
        assert gate.wait_s(200.0) == 0


# --- the keys a device trusts: from verified roots, kept across restarts -----------------------


class Repo:
    """A fleet repository in a folder, as fleet-init makes it, that rotates its director."""

    def __init__(self, tmp: Path) -> None:
        self.keys = tmp / "repo-keys"
        self.writer = RepositoryWriter.create(tmp / "repo", self.keys)
        self.anchor = self.writer.root_bytes()

    def rotate_director(self, *keys: Ed25519PrivateKey) -> int:
        now = datetime.datetime.now(datetime.UTC)
        current = self.writer.md[Root.type]
        new = next_root(current.signed, "director", now=now, director_pems=[pem(k) for k in keys])
        self.writer.accept_root(sign_root(new, [load_key(self.keys / "root-0.pem")]))
        return int(new.version)


def enrollment(*keys: Ed25519PrivateKey) -> Enrollment:
    return Enrollment(
        fleet=FLEET,
        device_id=DEVICE,
        hardware_class="x86",
        broker_url="mqtt://127.0.0.1:1883",
        control_url="http://127.0.0.1:1",
        repository_url="http://127.0.0.1:1",
        director_keys=tuple(pem(k) for k in keys),
    )


@pytest.fixture
def device(tmp_path: Path) -> Any:
    """A device's state dir and a trust client on the repository folder."""
    repo = Repo(tmp_path)
    state = tmp_path / "state"
    metadata = state / "registry" / "metadata"
    clock = LastKnownGoodClock(tmp_path / "clock.json")
    client = TrustClient(metadata, repo.anchor, [str(repo.writer.root_dir)], clock)
    return repo, state, metadata, client


class TestDirectorTrust:
    def test_the_bundles_keys_stand_until_a_verified_root_names_others(self, device):
        """Before any rotation the root says nothing about the director: the bundle rules."""
        _repo, state, metadata, client = device
        client.refresh()
        trust = DirectorTrust(state, enrollment(OLD), metadata)
        assert trust.learn() is None
        assert trust.keys.keyids == keyring(OLD).keyids

    def test_a_rotation_is_learned_after_a_refresh_and_kept_across_a_restart(self, device):
        """Root v2 names the new key: after the refresh it replaces the bundle's, and a new
        DirectorTrust (a restarted agent) starts with it, from the persisted file."""
        repo, state, metadata, client = device
        (state / "fleet").mkdir(parents=True)
        trust = DirectorTrust(state, enrollment(OLD), metadata)
        version = repo.rotate_director(NEW)
        assert trust.learn() is None  # not refreshed yet: nothing verified names it
        client.refresh()
        learned = trust.learn()
        assert learned is not None
        assert learned.keyids == keyring(NEW).keyids
        assert trust.root_version == version
        restarted = DirectorTrust(state, enrollment(OLD), metadata)
        assert restarted.keys.keyids == keyring(NEW).keyids
        saved = read_learned_director_keys(state)
        assert saved is not None
        assert saved.root_version == version

    def test_a_device_walks_two_director_rotations_and_the_retired_key_stays_out(self, device):
        """Offline through v2 (old + new) and v3 (new only), it walks 1 -> 2 -> 3 and trusts
        the new key alone; an older root found later never brings the old one back."""
        repo, state, metadata, client = device
        (state / "fleet").mkdir(parents=True)
        trust = DirectorTrust(state, enrollment(OLD), metadata)
        repo.rotate_director(OLD, NEW)
        repo.rotate_director(NEW)
        client.refresh()
        assert sorted(p.name for p in (metadata / "root_history").iterdir()) == [
            "1.root.json",
            "2.root.json",
            "3.root.json",
        ]
        learned = trust.learn()
        assert learned is not None
        assert learned.keyids == keyring(NEW).keyids
        (metadata / "root.json").unlink()  # a cache pointing at an older root, say v2
        (metadata / "root.json").symlink_to("root_history/2.root.json")
        assert trust.learn() is None
        assert trust.keys.keyids == keyring(NEW).keyids

    def test_a_forged_root_teaches_nothing(self, device):
        """A root v2 naming an attacker's key, signed by the attacker: ngclient refuses it,
        and the device keeps the keys it had."""
        repo, state, metadata, client = device
        (state / "fleet").mkdir(parents=True)
        trust = DirectorTrust(state, enrollment(OLD), metadata)
        attacker = Ed25519PrivateKey.generate()
        now = datetime.datetime.now(datetime.UTC)
        forged = next_root(
            repo.writer.md[Root.type].signed, "director", now=now, director_pems=[pem(attacker)]
        )
        repo.writer.accept_root(sign_root(forged, [CryptoSigner(attacker)]))
        with pytest.raises(VerificationError):
            client.refresh()
        assert trust.learn() is None
        assert trust.keys.keyids == keyring(OLD).keyids
        assert not (fleet_dir(state) / DIRECTOR_KEYS_FILE).exists()

    def test_enrolling_again_forgets_learned_keys(self, device, tmp_path: Path):
        """A new enrollment is a new trust root: keys learned under the old one go."""
        repo, state, metadata, client = device
        (state / "fleet").mkdir(parents=True)
        repo.rotate_director(NEW)
        client.refresh()
        DirectorTrust(state, enrollment(OLD), metadata).learn()
        assert (fleet_dir(state) / DIRECTOR_KEYS_FILE).exists()
        write_enrollment(state, enrollment(OLD), repo.anchor)
        assert not (fleet_dir(state) / DIRECTOR_KEYS_FILE).exists()

    def test_an_unreadable_learned_file_falls_back_to_the_bundle(self, device):
        """A corrupt file is reported and ignored (the next refresh writes it again)."""
        _repo, state, metadata, _client = device
        (state / "fleet").mkdir(parents=True)
        (fleet_dir(state) / DIRECTOR_KEYS_FILE).write_text('{"root_version": "x"}')
        assert read_learned_director_keys(state) is None
        trust = DirectorTrust(state, enrollment(OLD), metadata)
        assert trust.keys.keyids == keyring(OLD).keyids


def test_the_root_field_is_covered_by_root_signatures(tmp_path: Path):
    """Editing the director keys of a published root breaks its signatures: ngclient refuses
    it rather than teach the device an unsigned key."""
    repo = Repo(tmp_path)
    repo.rotate_director(NEW)
    path = repo.writer.metadata_dir / "2.root.json"
    data = json.loads(path.read_bytes())
    data["signed"]["x-edgelm-director-keys"] = [pem(Ed25519PrivateKey.generate())]
    path.write_text(json.dumps(data))
    Metadata[Root].from_file(str(path))  # still well-formed
    client = TrustClient(
        tmp_path / "m", repo.anchor, [str(repo.writer.root_dir)], LastKnownGoodClock(tmp_path / "c")
    )
    with pytest.raises(VerificationError):
        client.refresh()
