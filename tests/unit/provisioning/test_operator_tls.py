"""The operator's commands trust the fleet's current CA for the control plane, and nothing else."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgelm_provisioning.operator_tls import fleet_ssl_context, fleet_trust_files


def ca_pem(name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def fleet_root(tmp_path: Path) -> Path:
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "ca.pem").write_text(ca_pem("fleet CA new"))
    (tmp_path / "tls" / "ca-previous.pem").write_text(ca_pem("fleet CA old"))
    return tmp_path


class TestFleetTrust:
    def test_only_the_current_ca_is_trusted_during_a_rotation(self, fleet_root: Path) -> None:
        """The previous CA, maybe leaked, cannot certify a server the operator would talk to."""
        assert fleet_trust_files(fleet_root) == [fleet_root / "tls" / "ca.pem"]
        context = fleet_ssl_context(fleet_root)
        assert context is not None
        subjects = [str(cert["subject"]) for cert in context.get_ca_certs()]
        assert len(subjects) == 1
        assert "fleet CA new" in subjects[0]

    def test_the_system_store_is_not_loaded_beside_the_fleet_ca(
        self, fleet_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """$SSL_CERT_FILE, or any public CA, adds nothing to a fleet's trust."""
        other = tmp_path / "other.pem"
        other.write_text(ca_pem("someone else"))
        monkeypatch.setenv("SSL_CERT_FILE", str(other))
        context = fleet_ssl_context(fleet_root)
        assert context is not None
        assert len(context.get_ca_certs()) == 1

    def test_without_a_fleet_ca_the_system_store_applies(self, tmp_path: Path) -> None:
        """No fleet directory, or one without a CA: None, which means the system's store."""
        assert fleet_ssl_context(None) is None
        assert fleet_ssl_context(tmp_path) is None
