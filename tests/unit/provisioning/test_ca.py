"""The fleet CA: what fleet-init and ca-init make, device certificates, revocation, broker
configuration."""

from __future__ import annotations

import datetime as dt
import json
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgelm_agent.config import AgentConfig
from edgelm_agent.enrollment import Enrollment, EnrollmentError, tls_files, write_enrollment
from edgelm_agent.sync.service import mqtt_settings
from edgelm_protocol.topics import CHANNELS, Direction
from edgelm_provisioning.broker_config import emqx_acl, mosquitto_acl, write_broker_config
from edgelm_provisioning.enrollment import issue_device
from edgelm_provisioning.errors import AlreadyIssued, InvalidValue, NotIssued
from edgelm_provisioning.fleet_ca import CONTROL_CN, CaPaths, FleetCa, revoke_device
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import add_ca, init_fleet

NOW = 1_795_344_276
#: The CVE-2017-7650 class: ids that would escape an ACL pattern, and the control identity.
WILDCARD_IDS = ["+", "#", "a/b", "kiosk+", "kiosk#", "$SYS", "control", "+/#"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_fleet(root: Path, broker_url: str = "mqtts://broker.example:8883") -> FleetDir:
    init_fleet(
        root, fleet="acme", control_url="https://cp.example:8443", broker_url=broker_url, now=NOW
    )
    return FleetDir.open(root)


@pytest.fixture
def fleet(tmp_path: Path) -> FleetDir:
    return make_fleet(tmp_path / "acme")


def issue(fleet: FleetDir, device: str, out: Path, **kwargs: Any) -> dict[str, Any]:
    issue_device(
        fleet,
        device,
        hardware_class=kwargs.pop("hardware_class", "pi5"),
        labels=None,
        out=out,
        reissue=bool(kwargs.pop("reissue", False)),
        now=NOW,
        **kwargs,
    )
    data: dict[str, Any] = json.loads(out.read_bytes())
    return data


def device_cert(bundle: dict[str, Any]) -> x509.Certificate:
    tls = bundle["tls"]
    assert isinstance(tls, dict)
    return x509.load_pem_x509_certificate(tls["cert"].encode())


class TestFleetInitMakesTheCa:
    def test_the_ca_key_stays_0600_and_the_ca_is_a_ca(self, fleet):
        """keys/fleet-ca.pem is 0600 in the 0700 keys/; tls/ca.pem is a CA with pathlen 0."""
        paths = CaPaths(fleet.paths.root)
        assert mode(paths.ca_key) == 0o600
        assert mode(paths.ca_key.parent) == 0o700
        ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert (constraints.ca, constraints.path_length) == (True, 0)
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_cert_sign
        assert usage.crl_sign

    def test_the_broker_certificate_names_localhost_and_the_broker_host(self, fleet):
        """Default SANs: localhost, 127.0.0.1 and the broker URL's host; serverAuth only."""
        paths = CaPaths(fleet.paths.root)
        cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["localhost", "broker.example"]
        assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
        assert mode(paths.server_key) == 0o600

    def test_sans_can_be_chosen(self, tmp_path):
        """--san replaces the defaults; a SAN that is neither a name nor an address is refused."""
        init_fleet(
            tmp_path / "f",
            fleet="acme",
            control_url="http://cp:8480",
            broker_url="mqtts://mq.lan",
            now=NOW,
            sans=["mq.lan", "10.0.0.5"],
        )
        cert = x509.load_pem_x509_certificate(CaPaths(tmp_path / "f").server_cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["mq.lan"]
        with pytest.raises(InvalidValue):
            init_fleet(
                tmp_path / "g",
                fleet="acme",
                control_url="http://cp:8480",
                broker_url="mqtts://mq.lan",
                now=NOW,
                sans=["bad name"],
            )

    def test_the_control_plane_identity_is_control_and_its_toml_points_at_it(self, fleet):
        """control/tls/client.pem has CN control (never a device id), clientAuth only."""
        paths = CaPaths(fleet.paths.root)
        cert = x509.load_pem_x509_certificate(paths.control_cert.read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CONTROL_CN
        assert mode(paths.control_key) == 0o600
        toml = tomllib.loads(fleet.paths.control_toml.read_text())
        for key in ("broker_ca", "broker_cert", "broker_key"):
            assert (fleet.paths.control_dir / toml[key]).is_file()

    def test_ca_init_gives_an_old_fleet_a_ca_once(self, tmp_path):
        """A fleet without a CA gets one (and control.toml its keys); a second is refused."""
        fleet = make_fleet(tmp_path / "old")
        for path in (CaPaths(fleet.paths.root).ca_key, CaPaths(fleet.paths.root).ca_cert):
            path.unlink()
        toml = fleet.paths.control_toml
        toml.write_text(
            "\n".join(
                line for line in toml.read_text().splitlines() if not line.startswith("broker_")
            )
            + "\n"
        )
        add_ca(fleet.paths.root, fleet.config, now=NOW, sans=None)
        assert tomllib.loads(toml.read_text())["broker_cert"] == "tls/client.pem"
        assert FleetCa.load(fleet.paths.root).cert.subject
        with pytest.raises(AlreadyIssued):
            add_ca(fleet.paths.root, fleet.config, now=NOW, sans=None)


class TestDeviceCertificates:
    def test_the_certificate_is_a_client_only_leaf_named_by_the_device(self, fleet, tmp_path):
        """CN = device id, clientAuth only, CA:FALSE, digitalSignature, random 128-bit serial,
        signed by the fleet CA, valid 730 days by default."""
        bundle = issue(fleet, "kiosk-17", tmp_path / "k.json")
        cert = device_cert(bundle)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kiosk-17"
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature
        assert not usage.key_cert_sign
        assert 0 < cert.serial_number < 1 << 128
        ca = FleetCa.load(fleet.paths.root)
        cert.verify_directly_issued_by(ca.cert)
        assert cert.not_valid_after_utc == dt.datetime.fromtimestamp(NOW, dt.UTC) + dt.timedelta(
            days=730
        )
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)

    def test_validity_is_configurable_and_serials_differ(self, fleet, tmp_path):
        """--cert-days sets the validity; two certificates never share a serial."""
        a = device_cert(issue(fleet, "a", tmp_path / "a.json", cert_days=30))
        b = device_cert(issue(fleet, "b", tmp_path / "b.json"))
        assert a.not_valid_after_utc - a.not_valid_before_utc == dt.timedelta(days=30, minutes=5)
        assert a.serial_number != b.serial_number
        with pytest.raises(InvalidValue):
            issue(fleet, "c", tmp_path / "c.json", cert_days=0)

    @pytest.mark.parametrize("device", WILDCARD_IDS)
    def test_wildcard_ids_get_no_certificate(self, fleet, tmp_path, device):
        """+, #, a/b and the control identity are refused before any key or certificate is
        made (CVE-2017-7650: a CN with a wildcard would escape the %u ACL pattern)."""
        with pytest.raises(InvalidValue):
            issue(fleet, device, tmp_path / "x.json")
        assert not (tmp_path / "x.json").exists()
        issued = [i["kind"] for i in FleetCa.load(fleet.paths.root).register()]
        assert issued == ["server", "server", "control"]  # fleet-init's three, no device's

    def test_the_ca_key_is_never_in_a_bundle(self, fleet, tmp_path):
        """The bundle holds the CA certificate, the device's key and certificate, nothing of
        the CA's key."""
        issue(fleet, "k", tmp_path / "k.json")
        raw = (tmp_path / "k.json").read_text()
        ca_key = CaPaths(fleet.paths.root).ca_key.read_text()
        body = "".join(ca_key.splitlines()[1:-1])
        assert body not in raw.replace("\\n", "")
        assert mode(tmp_path / "k.json") == 0o600

    def test_a_bundle_without_tls_stays_valid(self, fleet, tmp_path):
        """Old bundles (no tls) enroll as before; with tls the identity is checked."""
        bundle = issue(fleet, "k", tmp_path / "k.json")
        old = {k: v for k, v in bundle.items() if k != "tls"}
        old["broker"] = {"url": "mqtt://broker.example:1883"}
        assert Enrollment.from_bundle(old).tls_ca is None
        assert Enrollment.from_bundle(bundle).tls_cert == bundle["tls"]["cert"]

    def test_a_bundle_with_someone_elses_certificate_is_refused(self, fleet, tmp_path):
        """The agent refuses tls whose CN is not the device id, or whose key does not match."""
        a = issue(fleet, "a", tmp_path / "a.json")
        b = issue(fleet, "b", tmp_path / "b.json")
        swapped = dict(a, tls=b["tls"])
        with pytest.raises(EnrollmentError, match="not 'a'"):
            Enrollment.from_bundle(swapped)
        mixed = dict(a, tls=dict(a["tls"], key=b["tls"]["key"]))
        with pytest.raises(EnrollmentError, match="does not belong"):
            Enrollment.from_bundle(mixed)

    @pytest.mark.parametrize(
        ("url", "refused"),
        [
            ("mqtt://broker.example:1883", True),
            ("mqtt://10.0.0.5:1883", True),
            ("mqtt://127.0.0.1:1883", False),
            ("mqtt://localhost:1883", False),
            ("mqtt://[::1]:1883", False),
            ("mqtts://broker.example:8883", False),
        ],
    )
    def test_plain_mqtt_is_refused_off_loopback_when_the_bundle_has_a_ca(
        self, fleet, tmp_path, url, refused
    ):
        """There is no TLS-off switch: mqtt:// is for a broker on the same machine only."""
        bundle = dict(issue(fleet, "k", tmp_path / "k.json"))
        bundle["broker"] = {"url": url}
        if refused:
            with pytest.raises(EnrollmentError, match="not a loopback address"):
                Enrollment.from_bundle(bundle)
        else:
            assert Enrollment.from_bundle(bundle).broker_url == url

    def test_enrollment_writes_the_identity_0600_and_mqtts_uses_it(self, fleet, tmp_path):
        """The state dir gets ca/cert/key 0600 in a 0700 folder; mqtt_settings loads them
        into the TLS context (the fleet CA as the only trust anchor)."""
        bundle = issue(fleet, "k", tmp_path / "k.json")
        enrollment = Enrollment.from_bundle(bundle)
        state = tmp_path / "state"
        write_enrollment(state, enrollment, b"{}")
        files = tls_files(state)
        assert [mode(f) for f in files] == [0o600] * 3
        assert mode(files[0].parent) == 0o700
        settings = mqtt_settings(AgentConfig(state_dir=state), enrollment)
        assert settings.tls is not None
        assert [c["subject"] for c in settings.tls.get_ca_certs()] == [
            ((("organizationName", "edgelm"),), (("commonName", "edgelm fleet acme CA"),))
        ]


class TestRevocation:
    def test_revoke_puts_every_certificate_of_the_device_in_the_crl(self, fleet, tmp_path):
        """revoke lists the device's serials in tls/crl.pem, signed by the CA; others are not."""
        a = device_cert(issue(fleet, "a", tmp_path / "a.json"))
        b = device_cert(issue(fleet, "b", tmp_path / "b.json"))
        serials, crl_path = revoke_device(fleet.paths.root, "a", now=NOW + 10)
        assert serials == [format(a.serial_number, "x")]
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        assert crl.is_signature_valid(FleetCa.load(fleet.paths.root).key.public_key())
        assert crl.get_revoked_certificate_by_serial_number(a.serial_number) is not None
        assert crl.get_revoked_certificate_by_serial_number(b.serial_number) is None

    def test_revoking_twice_or_an_unknown_device_is_an_error(self, fleet, tmp_path):
        issue(fleet, "a", tmp_path / "a.json")
        revoke_device(fleet.paths.root, "a", now=NOW)
        with pytest.raises(NotIssued, match="no unrevoked"):
            revoke_device(fleet.paths.root, "a", now=NOW)
        with pytest.raises(NotIssued, match="ever issued"):
            revoke_device(fleet.paths.root, "nobody", now=NOW)

    def test_a_reissue_revokes_the_previous_certificate(self, fleet, tmp_path):
        """--reissue makes a new certificate and puts the old one in the CRL."""
        old = device_cert(issue(fleet, "a", tmp_path / "a.json"))
        new = device_cert(issue(fleet, "a", tmp_path / "a.json", reissue=True))
        crl = x509.load_pem_x509_crl(CaPaths(fleet.paths.root).crl.read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(old.serial_number) is not None
        assert crl.get_revoked_certificate_by_serial_number(new.serial_number) is None


class TestBrokerConfig:
    def test_the_acl_follows_the_channel_table(self):
        """Devices write exactly the up channels and read exactly the down ones, under their
        own %u; read announce; the control identity gets the fleet's whole tree."""
        acl = mosquitto_acl("acme").splitlines()
        for channel, spec in CHANNELS.items():
            if spec.direction is Direction.DEVICE_TO_CONTROL:
                assert f"pattern write edgelm/v1/acme/dev/%u/{channel}" in acl
            elif spec.direction is Direction.CONTROL_TO_DEVICE:
                assert f"pattern read edgelm/v1/acme/dev/%u/{channel}" in acl
        assert "pattern read edgelm/v1/acme/announce" in acl
        assert acl[acl.index("user control") + 1] == "topic readwrite edgelm/v1/acme/#"
        assert not any("readwrite" in line and "%u" in line for line in acl)

    def test_emqx_rules_use_username_placeholders_and_deny_the_rest(self):
        rules = emqx_acl("acme")
        assert '"edgelm/v1/acme/dev/${username}/state"' in rules
        assert '"edgelm/v1/acme/dev/${username}/desired"' in rules
        assert rules.rstrip().endswith("{deny, all}.")

    def test_the_config_requires_certificates_and_is_not_overwritten(self, fleet, tmp_path):
        out = tmp_path / "broker"
        write_broker_config(fleet, out, port=None, bind=None, install_dir=None, now=NOW)
        conf = (out / "mosquitto.conf").read_text().splitlines()
        for line in (
            "allow_anonymous false",
            "require_certificate true",
            "use_identity_as_username true",
            "persistence true",
            "listener 8883",
            f"crlfile {out.absolute() / 'crl.pem'}",
        ):
            assert line in conf
        assert mode(out / "server-key.pem") == 0o600
        with pytest.raises(AlreadyIssued):
            write_broker_config(fleet, out, port=None, bind=None, install_dir=None, now=NOW)
        write_broker_config(
            fleet, out, port=1234, bind="127.0.0.1", install_dir=Path("/etc/m"), now=NOW, force=True
        )
        conf = (out / "mosquitto.conf").read_text().splitlines()
        assert "listener 1234 127.0.0.1" in conf
        assert "cafile /etc/m/ca.pem" in conf


class TestControlPlaneTls:
    def test_control_toml_from_fleet_init_gives_a_mutual_tls_session(self, fleet):
        """The generated control.toml's broker_* keys load into the link's TLS context."""
        from edgelm_control.config import load_config
        from edgelm_control.fleet.link import mqtt_settings as control_settings

        config = load_config(fleet.paths.control_toml, {})
        assert config.broker_cert == fleet.paths.control_dir / "tls" / "client.pem"
        settings = control_settings(
            config.broker,
            client_id=config.client_id,
            receive_maximum=10,
            session_expiry_s=10,
            ca_file=config.broker_ca,
            cert_file=config.broker_cert,
            key_file=config.broker_key,
        )
        assert settings.tls is not None
        assert len(settings.tls.get_ca_certs()) == 1  # the fleet CA only

    def test_plain_mqtt_off_loopback_is_refused_with_a_ca(self, tmp_path):
        from edgelm_control.config import resolve_config
        from edgelm_control.errors import ConfigError

        base = {"fleet": "acme", "broker_ca": "ca.pem"}
        with pytest.raises(ConfigError, match="not a loopback address"):
            resolve_config(toml_data=base | {"broker_url": "mqtt://broker.lan"}, toml_dir=tmp_path)
        ok = resolve_config(toml_data=base | {"broker_url": "mqtt://127.0.0.1"}, toml_dir=tmp_path)
        assert ok.broker_ca == tmp_path / "ca.pem"
        with pytest.raises(ConfigError, match="go together"):
            resolve_config(toml_data={"fleet": "acme", "broker_cert": "c.pem"}, toml_dir=tmp_path)
