"""``edgelm provision ca-rotate``, ``control-identity`` and ``device --csr`` as scripts call
them: ``--json`` output, exit statuses and error references."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgelm_provisioning.fleet_dir import FleetDir
from tests.integration.provisioning.conftest import error_json, ok_json, run_provision


def write_request(path: Path, cn: str, *, ca: bool = False) -> Path:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    request = builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    return path


class TestCaRotateCommand:
    def test_start_then_finish_as_json(self, fleet_dir: FleetDir, tmp_path):
        """Start reports the overlap and what it wrote; finish is refused (status 1, a stable
        reference) while a device is on the old CA only, and goes through after a reissue."""
        root = fleet_dir.paths.root
        out = tmp_path / "k.json"
        ok_json(
            run_provision(
                "device", "k", "--fleet-dir", root, "--class", "x86", "--out", out, "--json"
            )
        )
        started = ok_json(run_provision("ca-rotate", "--fleet-dir", root, "--json"))
        assert started["phase"] == "overlap"
        assert started["devices_on_previous_ca"] == ["k"]
        assert "tls/ca-cross.pem" in started["written"]
        refused = error_json(run_provision("ca-rotate", "--finish", "--fleet-dir", root, "--json"))
        assert refused["reference"] == "devices-on-previous-ca"
        ok_json(
            run_provision("device", "k", "--fleet-dir", root, "--reissue", "--out", out, "--json")
        )
        finished = ok_json(run_provision("ca-rotate", "--finish", "--fleet-dir", root, "--json"))
        assert finished["phase"] == "finished"
        assert finished["previous_ca"] == started["previous_ca"]
        assert "keys/fleet-ca-previous.pem" in finished["removed"]

    def test_finish_without_a_rotation_is_an_error(self, fleet_dir: FleetDir):
        """Nothing to finish: status 1 and a message that says so."""
        error = error_json(
            run_provision("ca-rotate", "--finish", "--fleet-dir", fleet_dir.paths.root, "--json")
        )
        assert "no CA rotation is in progress" in error["message"]


class TestControlIdentityCommand:
    def test_issue_reissue_revoke(self, fleet_dir: FleetDir):
        """The JSON gives the CN and the paths control.toml takes; a second issue needs
        --reissue; --revoke lists the revoked serials."""
        root = fleet_dir.paths.root
        issued = ok_json(run_provision("control-identity", "eu-1", "--fleet-dir", root, "--json"))
        assert issued["cn"] == "control:eu-1"
        assert issued["broker_cert"] == "tls/replicas/eu-1/client.pem"
        assert (fleet_dir.paths.control_dir / issued["broker_key"]).is_file()
        again = error_json(run_provision("control-identity", "eu-1", "--fleet-dir", root, "--json"))
        assert again["reference"] == "control-identity-exists"
        reissued = ok_json(
            run_provision("control-identity", "eu-1", "--fleet-dir", root, "--reissue", "--json")
        )
        assert reissued["revoked_serials"] == [issued["serial"]]
        revoked = ok_json(
            run_provision("control-identity", "eu-1", "--fleet-dir", root, "--revoke", "--json")
        )
        assert revoked["revoked_serials"] == [reissued["serial"]]

    def test_a_name_with_a_wildcard_is_refused(self, fleet_dir: FleetDir):
        """A replica name is refused before any key is made."""
        error = error_json(
            run_provision("control-identity", "eu+1", "--fleet-dir", fleet_dir.paths.root, "--json")
        )
        assert error["reference"] == "invalid-name"


class TestDeviceCsrOption:
    def test_a_signed_request_gives_a_bundle_without_a_key(self, fleet_dir: FleetDir, tmp_path):
        """--csr: the JSON says the key is not in the bundle and came from a request."""
        request = write_request(tmp_path / "k.csr", "k")
        issued = ok_json(
            run_provision(
                "device", "k", "--fleet-dir", fleet_dir.paths.root, "--class", "x86",
                "--csr", request, "--out", tmp_path / "k.json", "--json",
            )
        )  # fmt: skip
        assert (issued["key_in_bundle"], issued["from_csr"]) == (False, True)

    def test_hostile_requests_are_refused_with_their_reason(self, fleet_dir: FleetDir, tmp_path):
        """Another device's CN, or a request to be a CA: status 1, csr-<reason>, no bundle."""
        for request, code in (
            (write_request(tmp_path / "other.csr", "other"), "csr-wrong-cn"),
            (write_request(tmp_path / "ca.csr", "k", ca=True), "csr-ca-requested"),
        ):
            error = error_json(
                run_provision(
                    "device", "k", "--fleet-dir", fleet_dir.paths.root, "--class", "x86",
                    "--csr", request, "--out", tmp_path / "k.json", "--json",
                )
            )  # fmt: skip
            assert error["reference"] == code
            assert not (tmp_path / "k.json").exists()
