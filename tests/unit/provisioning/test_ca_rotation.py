"""CA rotation with an overlap period, and one broker identity per control-plane replica: the
files each step writes, what each trusts, and what the broker configuration grants. The real
broker's side is in tests/integration/test_mtls.py."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from edgelm_agent.enrollment import Enrollment
from edgelm_provisioning.broker_config import emqx_acl, mosquitto_acl, write_broker_config
from edgelm_provisioning.ca_rotation import finish_rotation, start_rotation
from edgelm_provisioning.control_identity import (
    control_identities,
    issue_control_identity,
    replica_cn,
    revoke_control_identity,
)
from edgelm_provisioning.enrollment import issue_device
from edgelm_provisioning.errors import AlreadyIssued, FleetDirError, InvalidValue, NotIssued
from edgelm_provisioning.fleet_ca import CaPaths, FleetCa, key_id, key_pem, new_key
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet

NOW = int(time.time())


@pytest.fixture
def fleet(tmp_path: Path) -> FleetDir:
    init_fleet(
        tmp_path / "acme",
        fleet="acme",
        control_url="https://cp.example:8443",
        broker_url="mqtts://broker.example:8883",
        now=NOW,
    )
    return FleetDir.open(tmp_path / "acme")


def issue(fleet: FleetDir, device: str, out: Path, *, reissue: bool = False) -> dict[str, Any]:
    issue_device(
        fleet, device, hardware_class="pi5", labels=None, out=out, reissue=reissue, now=NOW
    )
    data: dict[str, Any] = json.loads(out.read_bytes())
    return data


def certs(pem: bytes | str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode() if isinstance(pem, str) else pem)


def chain_verifies(leaf_and_chain: list[x509.Certificate], anchor: x509.Certificate) -> bool:
    """Whether some path from the leaf through the given chain ends at ``anchor``."""
    current = leaf_and_chain[0]
    for nxt in [*leaf_and_chain[1:], anchor]:
        try:
            current.verify_directly_issued_by(nxt)
        except (ValueError, TypeError, InvalidSignature):
            continue  # not this one's issuer: try the next certificate of the chain
        if nxt is anchor:
            return True
        current = nxt
    return False


class TestRotationStart:
    def test_the_new_ca_has_the_old_name_and_a_new_key(self, fleet):
        """Same subject (so the cross-certificate is self-issued), new key; the old CA sits
        beside it, its key 0600."""
        before = FleetCa.load(fleet.paths.root)
        rotation = start_rotation(fleet.paths.root, fleet.config, now=NOW)
        ca = FleetCa.load(fleet.paths.root)
        assert ca.rotating
        assert ca.cert.subject == before.cert.subject
        assert key_id(ca.cert) != key_id(before.cert) == rotation.previous_ca
        assert ca.previous is not None
        assert key_id(ca.previous) == key_id(before.cert)
        assert stat.S_IMODE(ca.paths.previous_ca_key.stat().st_mode) == 0o600

    def test_the_cross_certificate_is_the_new_key_signed_by_the_old_ca(self, fleet):
        """NewWithOld: subject and issuer the CA's name, the new key, the old CA's signature
        and key id; a CA with path length 0."""
        start_rotation(fleet.paths.root, fleet.config, now=NOW)
        ca = FleetCa.load(fleet.paths.root)
        assert ca.cross is not None
        assert ca.previous is not None
        assert ca.cross.subject == ca.cross.issuer == ca.cert.subject
        assert ca.cross.public_key() == ca.cert.public_key()
        ca.cross.verify_directly_issued_by(ca.previous)
        constraints = ca.cross.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert (constraints.ca, constraints.path_length) == (True, 0)

    def test_servers_chain_to_either_ca(self, fleet):
        """The new broker and HTTPS certificates verify under the new CA, and through the
        cross-certificate under the old one."""
        old = FleetCa.load(fleet.paths.root).cert
        start_rotation(fleet.paths.root, fleet.config, now=NOW)
        ca = FleetCa.load(fleet.paths.root)
        for path in (ca.paths.server_cert, ca.paths.control_server_cert):
            chain = certs(path.read_bytes())
            assert len(chain) == 2
            assert chain_verifies(chain[:1], ca.cert)
            assert chain_verifies(chain, old)

    def test_the_broker_keeps_its_names(self, fleet):
        """The new broker certificate has the old one's SANs unless --san says otherwise."""
        paths = CaPaths(fleet.paths.root)

        def sans() -> list[str]:
            cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            return [str(n.value) for n in names]

        before = sans()
        start_rotation(fleet.paths.root, fleet.config, now=NOW)
        assert sans() == before

    def test_bundles_of_the_overlap_trust_the_new_ca_alone(self, fleet, tmp_path):
        """During the overlap a bundle's ca is the new CA only (the old CA's key may be why
        the CA rotates); its certificate is the new CA's, and the agent accepts it."""
        start_rotation(fleet.paths.root, fleet.config, now=NOW)
        ca = FleetCa.load(fleet.paths.root)
        bundle = issue(fleet, "k", tmp_path / "k.json")
        assert certs(bundle["tls"]["ca"]) == [ca.cert]
        cert = x509.load_pem_x509_certificate(bundle["tls"]["cert"].encode())
        cert.verify_directly_issued_by(ca.cert)
        assert Enrollment.from_bundle(bundle).tls_ca == bundle["tls"]["ca"]

    def test_the_control_plane_gets_new_identities_and_the_trust_bundle(self, fleet):
        """control/tls: a new client certificate from the new CA, and ca.pem (what it verifies
        the broker against) the new CA alone."""
        paths = CaPaths(fleet.paths.root)
        before = paths.control_cert.read_bytes()
        start_rotation(fleet.paths.root, fleet.config, now=NOW)
        ca = FleetCa.load(fleet.paths.root)
        assert paths.control_cert.read_bytes() != before
        x509.load_pem_x509_certificate(paths.control_cert.read_bytes()).verify_directly_issued_by(
            ca.cert
        )
        assert certs(paths.control_ca.read_bytes()) == [ca.cert]

    def test_each_ca_revokes_what_it_issued(self, fleet, tmp_path):
        """crl.pem holds both CRLs; a device revoked during the overlap is in its issuer's."""
        old_device = x509.load_pem_x509_certificate(
            issue(fleet, "a", tmp_path / "a.json")["tls"]["cert"].encode()
        )
        start_rotation(fleet.paths.root, fleet.config, now=NOW)
        new_device = x509.load_pem_x509_certificate(
            issue(fleet, "b", tmp_path / "b.json")["tls"]["cert"].encode()
        )
        ca = FleetCa.load(fleet.paths.root)
        ca.revoke("a", now=NOW)
        ca.revoke("b", now=NOW)
        crls = [
            x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + part)
            for part in ca.paths.crl.read_bytes().split(b"-----BEGIN X509 CRL-----")[1:]
        ]
        assert len(crls) == 2
        new_crl, old_crl = crls
        assert new_crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
        assert old_crl.is_signature_valid(ca.previous.public_key())  # type: ignore[arg-type, union-attr]
        assert new_crl.get_revoked_certificate_by_serial_number(new_device.serial_number)
        assert not new_crl.get_revoked_certificate_by_serial_number(old_device.serial_number)
        assert old_crl.get_revoked_certificate_by_serial_number(old_device.serial_number)

    def test_a_start_interrupted_before_the_new_ca_was_written_can_run_again(self, fleet):
        """The old CA copied beside itself (a crash before the new one took its place) reads
        as no rotation, and ca-rotate then goes through."""
        paths = CaPaths(fleet.paths.root)
        paths.previous_ca_key.write_bytes(paths.ca_key.read_bytes())
        paths.previous_ca_cert.write_bytes(paths.ca_cert.read_bytes())
        assert not FleetCa.load(fleet.paths.root).rotating
        assert start_rotation(fleet.paths.root, fleet.config, now=NOW).phase == "overlap"
        assert FleetCa.load(fleet.paths.root).rotating

    def test_a_start_interrupted_between_the_new_key_and_its_certificate_is_refused(self, fleet):
        """The new CA's key beside the old CA's certificate (a crash between those two
        writes) is refused with a hint that restores the intact old CA; followed, ca-rotate
        goes through."""
        paths = CaPaths(fleet.paths.root)
        paths.previous_ca_key.write_bytes(paths.ca_key.read_bytes())
        paths.previous_ca_cert.write_bytes(paths.ca_cert.read_bytes())
        paths.ca_key.write_bytes(key_pem(new_key()))
        with pytest.raises(FleetDirError, match="is not the key of the CA certificate") as info:
            FleetCa.load(fleet.paths.root)
        assert info.value.reference == "fleet-ca-key-mismatch"
        assert f"copy {paths.previous_ca_key} over {paths.ca_key}" in (info.value.hint or "")
        paths.ca_key.write_bytes(paths.previous_ca_key.read_bytes())
        assert start_rotation(fleet.paths.root, fleet.config, now=NOW).phase == "overlap"

    def test_a_ca_key_that_is_not_the_certificate_s_is_refused(self, fleet, tmp_path):
        """Outside a rotation too: no certificate is issued with a key nothing verifies."""
        paths = CaPaths(fleet.paths.root)
        paths.ca_key.write_bytes(key_pem(new_key()))
        with pytest.raises(FleetDirError, match="refusing to issue with it") as info:
            issue(fleet, "k", tmp_path / "k.json")
        assert "backup" in (info.value.hint or "")
        assert not (tmp_path / "k.json").exists()

    def test_a_second_start_is_refused(self, fleet):
        """One rotation at a time: a second would drop the CA the devices still trust."""
        start_rotation(fleet.paths.root, fleet.config, now=NOW)
        with pytest.raises(AlreadyIssued, match="in progress"):
            start_rotation(fleet.paths.root, fleet.config, now=NOW)


class TestRotationFinish:
    def test_finishing_while_devices_hold_old_certificates_only_is_refused(self, fleet, tmp_path):
        """A device not reissued yet would be locked out: refused, naming it, until --force."""
        issue(fleet, "a", tmp_path / "a.json")
        issue(fleet, "b", tmp_path / "b.json")
        start_rotation(fleet.paths.root, fleet.config, now=NOW)
        issue(fleet, "a", tmp_path / "a.json", reissue=True)
        with pytest.raises(FleetDirError, match=r"1 device.* b$") as info:
            finish_rotation(fleet.paths.root, now=NOW)
        assert info.value.reference == "devices-on-previous-ca"
        assert FleetCa.load(fleet.paths.root).rotating
        assert finish_rotation(fleet.paths.root, now=NOW, force=True).devices_on_previous_ca == (
            "b",
        )

    def test_finishing_drops_the_old_ca_everywhere(self, fleet, tmp_path):
        """The old key is deleted; servers send their leaf alone; the trust bundles, the
        broker's ca.pem and crl.pem hold the new CA only."""
        start_rotation(fleet.paths.root, fleet.config, now=NOW)
        finish_rotation(fleet.paths.root, now=NOW)
        ca = FleetCa.load(fleet.paths.root)
        paths = ca.paths
        assert not ca.rotating
        for gone in (paths.previous_ca_key, paths.previous_ca_cert, paths.cross_cert):
            assert not gone.exists()
        assert len(certs(paths.server_cert.read_bytes())) == 1
        assert len(certs(paths.control_server_cert.read_bytes())) == 1
        assert certs(paths.control_ca.read_bytes()) == [ca.cert]
        broker = write_broker_config(
            fleet, tmp_path / "broker", port=8883, bind=None, install_dir=None, now=NOW
        )
        assert not broker.ca_rotation
        assert certs((tmp_path / "broker" / "ca.pem").read_bytes()) == [ca.cert]
        assert (tmp_path / "broker" / "crl.pem").read_bytes().count(b"BEGIN X509 CRL") == 1

    def test_finishing_without_a_rotation_is_an_error(self, fleet):
        """Nothing to finish: a clear error, nothing changed."""
        with pytest.raises(NotIssued, match="no CA rotation is in progress"):
            finish_rotation(fleet.paths.root, now=NOW)

    def test_the_broker_config_of_the_overlap_trusts_both(self, fleet, tmp_path):
        """broker-config during the overlap: ca.pem [new, old], two CRLs, the server chain."""
        start_rotation(fleet.paths.root, fleet.config, now=NOW)
        written = write_broker_config(
            fleet, tmp_path / "broker", port=8883, bind=None, install_dir=None, now=NOW
        )
        assert written.ca_rotation
        out = tmp_path / "broker"
        assert len(certs((out / "ca.pem").read_bytes())) == 2
        assert (out / "crl.pem").read_bytes().count(b"BEGIN X509 CRL") == 2
        assert len(certs((out / "server.pem").read_bytes())) == 2


class TestReplicaIdentities:
    def test_a_replica_gets_a_cn_no_device_can_take(self, fleet, tmp_path):
        """control:NAME, clientAuth only; provisioning refuses that CN as a device id."""
        identity = issue_control_identity(fleet.paths.root, "eu-1", now=NOW)
        cert = x509.load_pem_x509_certificate(identity.cert.read_bytes())
        assert cert.subject.rfc4514_string() == "CN=control:eu-1"
        assert stat.S_IMODE(identity.key.stat().st_mode) == 0o600
        with pytest.raises(InvalidValue):
            issue(fleet, "control:eu-1", tmp_path / "x.json")

    @pytest.mark.parametrize("name", ["+", "#", "a/b", "$SYS", "", "-x", "a b", "x" * 33])
    def test_unsafe_replica_names_are_refused(self, fleet, name):
        """A replica name is the control plane's replica alphabet: no wildcard can reach the
        ACL through a replica's CN."""
        with pytest.raises(InvalidValue):
            issue_control_identity(fleet.paths.root, name, now=NOW)

    def test_the_acl_gives_every_live_identity_the_control_rights(self, fleet, tmp_path):
        """control and each unrevoked replica get readwrite on the fleet; a revoked one
        disappears from the next broker-config."""
        issue_control_identity(fleet.paths.root, "eu-1", now=NOW)
        issue_control_identity(fleet.paths.root, "eu-2", now=NOW)
        ca = FleetCa.load(fleet.paths.root)
        names = control_identities(ca, now=NOW)
        assert names == ["control", "control:eu-1", "control:eu-2"]
        acl = mosquitto_acl("acme", tuple(names))
        for cn in names:
            assert f"user {cn}\ntopic readwrite edgelm/v1/acme/#\n" in acl
        emqx = emqx_acl("acme", tuple(names))
        assert '{allow, {username, "control:eu-2"}, all, ["edgelm/v1/acme/#"]}.' in emqx
        revoke_control_identity(fleet.paths.root, "eu-1", now=NOW)
        written = write_broker_config(
            fleet, tmp_path / "broker", port=8883, bind=None, install_dir=None, now=NOW
        )
        assert written.control_identities == ("control", "control:eu-2")
        assert "user control:eu-1\n" not in (tmp_path / "broker" / "acl").read_text()

    def test_a_second_identity_needs_reissue_which_revokes_the_first(self, fleet):
        """No silent second certificate; --reissue revokes the earlier one."""
        first = issue_control_identity(fleet.paths.root, "eu-1", now=NOW)
        with pytest.raises(AlreadyIssued, match="has an identity already") as info:
            issue_control_identity(fleet.paths.root, "eu-1", now=NOW)
        assert "--reissue" in (info.value.hint or "")
        second = issue_control_identity(fleet.paths.root, "eu-1", now=NOW, reissue=True)
        assert second.revoked == (first.serial,)

    def test_a_rotation_reissues_replica_identities_from_the_new_ca(self, fleet):
        """Every live control identity gets a certificate from the new CA at the rotation."""
        issue_control_identity(fleet.paths.root, "eu-1", now=NOW)
        rotation = start_rotation(fleet.paths.root, fleet.config, now=NOW)
        assert rotation.control_identities == ("control", "control:eu-1")
        ca = FleetCa.load(fleet.paths.root)
        cert = ca.paths.replica_dir("eu-1") / "client.pem"
        x509.load_pem_x509_certificate(cert.read_bytes()).verify_directly_issued_by(ca.cert)

    def test_replica_cn_is_control_colon_name(self):
        """The one place the CN form is made."""
        assert replica_cn("eu-1") == "control:eu-1"


def test_key_material_in_a_bundle_is_the_device_s_own(fleet, tmp_path):
    """A bundle's key matches its certificate also during an overlap (guards issue paths)."""
    start_rotation(fleet.paths.root, fleet.config, now=NOW)
    bundle = issue(fleet, "k", tmp_path / "k.json")
    key = serialization.load_pem_private_key(bundle["tls"]["key"].encode(), password=None)
    cert = x509.load_pem_x509_certificate(bundle["tls"]["cert"].encode())
    assert key.public_key() == cert.public_key()
