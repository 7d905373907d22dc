"""Keys made on the device: the operator's CA signs a request's key and nothing else of it,
hostile requests are refused with a reason, and the device pairs the certificate with the key
it kept."""

from __future__ import annotations

import json
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgelm_agent.enrollment import Enrollment, EnrollmentError, write_enrollment
from edgelm_agent.enrollment_key import (
    PendingKeyError,
    clear_pending,
    make_request,
    pair_pending_key,
    pending_files,
)
from edgelm_provisioning.csr import check_csr
from edgelm_provisioning.enrollment import issue_device
from edgelm_provisioning.errors import RefusedRequest
from edgelm_provisioning.fleet_ca import FleetCa
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet

NOW = 1_795_344_276
#: ``openssl req -new -newkey rsa:512 -nodes -subj /CN=kiosk-1``: cryptography will not make
#: an RSA key under 1024 bits, but a device's tools will.
#: ``openssl req -new -sha1 -subj /CN=kiosk-1`` on a P-256 key: cryptography signs no SHA-1.
SHA1_REQUEST = (
    b"-----BEGIN CERTIFICATE REQUEST-----\n"
    b"MIHLMHQCAQAwEjEQMA4GA1UEAwwHa2lvc2stMTBZMBMGByqGSM49AgEGCCqGSM49\n"
    b"AwEHA0IABC9ptNtI8PutnfRux0EuKbbmcXWqKTpyim2ZtseV/qjx74BOuptGRWIi\n"
    b"mGy26Ic7vE+BGLCTqXL6r6KiUK+cDiWgADAJBgcqhkjOPQQBA0gAMEUCIFG9atCA\n"
    b"Zpbi08PXKZ+iJRNvo08tXoHuszeo6WCeIettAiEAjA4FB5auSnw8jQlabt9HYNHS\n"
    b"lnziouvvAzbn1/giBo0=\n"
    b"-----END CERTIFICATE REQUEST-----\n"
)
RSA_512_REQUEST = (
    b"-----BEGIN CERTIFICATE REQUEST-----\n"
    b"MIHLMHcCAQAwEjEQMA4GA1UEAwwHa2lvc2stMTBcMA0GCSqGSIb3DQEBAQUAA0sA\n"
    b"MEgCQQDIllJej/fDzymtQC6iqXIEkHu5BoBG4ah4zwBc4SMBZV0C8Iaa7OBMxReQ\n"
    b"tmkPfMQsEdZOXqO7OtLeA3Uz/JMjAgMBAAGgADANBgkqhkiG9w0BAQsFAANBAAOW\n"
    b"gzCwWFkV92okD5Jx13peiZ4K0M7tWu1ixxw+ElOU3H6+AWwQs6ir4thHZ/0H4V6K\n"
    b"IM2d3DUpV3+yrrjttAk=\n"
    b"-----END CERTIFICATE REQUEST-----\n"
)


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


def request(
    cn: str | None = "kiosk-1",
    *,
    key: Any = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    extra_name: Sequence[x509.NameAttribute[str]] = (),
) -> bytes:
    """A PEM request built by hand, as a hostile or careless device might."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    attributes = [] if cn is None else [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([*attributes, *extra_name])
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    signed = builder.sign(
        key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    )
    return signed.public_bytes(serialization.Encoding.PEM)


def issue(fleet: FleetDir, device: str, out: Path, csr: bytes, **kwargs: Any) -> dict[str, Any]:
    issue_device(
        fleet,
        device,
        hardware_class="pi5",
        labels=None,
        out=out,
        reissue=bool(kwargs.pop("reissue", False)),
        now=NOW,
        csr=csr,
    )
    data: dict[str, Any] = json.loads(out.read_bytes())
    return data


def _usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class TestHostileRequests:
    def test_a_request_for_another_device_is_refused(self):
        """The CN must be exactly the id being issued."""
        with pytest.raises(RefusedRequest, match="expected a request for CN 'kiosk-1'") as info:
            check_csr(request("kiosk-2"), "kiosk-1")
        assert info.value.reference == "csr-wrong-cn"

    @pytest.mark.parametrize("cn", ["*", "+", "#", "kiosk/1", "control", "control:eu-1", "$SYS"])
    def test_wildcard_and_reserved_cns_are_refused(self, cn):
        """A wildcard, topic-level or reserved CN gets no certificate, whatever the id asked
        (the CVE-2017-7650 class), and a replica's CN cannot be asked for."""
        with pytest.raises(RefusedRequest) as info:
            check_csr(request(cn), cn)
        assert info.value.reason == "wrong-cn"
        with pytest.raises(RefusedRequest):
            check_csr(request(cn), "kiosk-1")

    def test_a_request_without_a_cn_or_with_two_is_refused(self):
        """No CN, or a second CN beside the right one, is not the device's name."""
        with pytest.raises(RefusedRequest, match="got CN none"):
            check_csr(request(None), "kiosk-1")
        two = [x509.NameAttribute(NameOID.COMMON_NAME, "kiosk-2")]
        with pytest.raises(RefusedRequest, match="got CN 'kiosk-1', 'kiosk-2'"):
            check_csr(request(extra_name=two), "kiosk-1")

    def test_other_subject_attributes_are_refused(self):
        """The subject is the CN alone; an O=, OU= or email is not silently dropped."""
        extra = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil")]
        with pytest.raises(RefusedRequest, match="the CN alone"):
            check_csr(request(extra_name=extra), "kiosk-1")

    def test_a_request_whose_key_was_swapped_does_not_verify(self):
        """Another key put in a signed request: the signature no longer verifies with it."""
        honest = x509.load_pem_x509_csr(request())
        other = ec.generate_private_key(ec.SECP256R1()).public_key()
        der = honest.public_bytes(serialization.Encoding.DER)
        spki = honest.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        forged = der.replace(
            spki,
            other.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        assert forged != der
        with pytest.raises(RefusedRequest, match="does not verify") as info:
            check_csr(forged, "kiosk-1")
        assert info.value.reference == "csr-bad-signature"

    @pytest.mark.parametrize(
        ("extension", "what"),
        [
            (x509.BasicConstraints(ca=True, path_length=None), "CA:TRUE"),
            (_usage(ca=True), "keyCertSign"),
        ],
    )
    def test_a_request_to_be_a_ca_is_refused(self, extension, what):
        """Asking for CA:TRUE or keyCertSign is reported, not quietly signed as a leaf."""
        with pytest.raises(RefusedRequest, match=what) as info:
            check_csr(request(extensions=[(extension, True)]), "kiosk-1")
        assert info.value.reason == "ca-requested"

    @pytest.mark.parametrize(
        ("key", "shown"),
        [
            (rsa.generate_private_key(65537, 1024), "RSA 1024-bit"),  # noqa: S505
            (rsa.generate_private_key(65537, 2048), "RSA 2048-bit"),
            (ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
            (ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
            (ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
        ],
    )
    def test_keys_other_than_p256_or_p384_are_refused(self, key, shown):
        """Only ECDSA P-256 and P-384 keys are certified; the message names what came."""
        with pytest.raises(RefusedRequest, match=shown) as info:
            check_csr(request(key=key), "kiosk-1")
        assert info.value.reason == "weak-key"

    def test_rsa_512_is_refused(self):
        """The textbook weak key: RSA-512, made with OpenSSL's own tools."""
        with pytest.raises(RefusedRequest, match="RSA 512-bit"):
            check_csr(RSA_512_REQUEST, "kiosk-1")

    def test_a_sha1_signature_is_refused(self):
        """A request signed with SHA-1 is refused as weak."""
        with pytest.raises(RefusedRequest, match="SHA-256 or stronger, got sha1") as info:
            check_csr(SHA1_REQUEST, "kiosk-1")
        assert info.value.reason == "weak-hash"

    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"not a request",
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            b"x" * 70_000,
        ],
    )
    def test_malformed_input_is_refused(self, data):
        """Empty, garbage, broken PEM and oversized input: a malformed request, no crash."""
        with pytest.raises(RefusedRequest) as info:
            check_csr(data, "kiosk-1")
        assert info.value.reason == "malformed"

    def test_a_refused_request_writes_nothing(self, fleet, tmp_path):
        """A refusal comes before any record, bundle or certificate exists."""
        with pytest.raises(RefusedRequest):
            issue(fleet, "kiosk-1", tmp_path / "k.json", request("kiosk-2"))
        assert not (tmp_path / "k.json").exists()
        assert not fleet.paths.device_record("kiosk-1").exists()
        kinds = [i["kind"] for i in FleetCa.load(fleet.paths.root).register()]
        assert "device" not in kinds


class TestSignedRequests:
    def test_the_ca_certifies_the_key_and_ignores_what_else_was_asked(self, fleet, tmp_path):
        """A SAN and a serverAuth EKU asked for are not granted: the certificate is the CA's
        clientAuth-only, CA:FALSE leaf for the request's key; the bundle holds no key."""
        key = ec.generate_private_key(ec.SECP384R1())
        asked = [
            (x509.SubjectAlternativeName([x509.DNSName("evil.example")]), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ]
        bundle = issue(fleet, "kiosk-1", tmp_path / "k.json", request(key=key, extensions=asked))
        assert set(bundle["tls"]) == {"ca", "cert"}
        cert = x509.load_pem_x509_certificate(bundle["tls"]["cert"].encode())
        assert cert.public_key() == key.public_key()
        assert cert.subject.rfc4514_string() == "CN=kiosk-1"
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    def test_the_ignored_extensions_are_reported(self):
        """The operator sees what the request asked for and did not get."""
        asked = [(x509.SubjectAlternativeName([x509.DNSName("a.example")]), False)]
        checked = check_csr(request(extensions=asked), "kiosk-1")
        assert checked.ignored_extensions == ("SubjectAlternativeName",)


class TestPendingKey:
    def test_the_key_stays_0600_in_a_0700_folder_and_is_reused(self, tmp_path):
        """--csr twice for one id keeps the key (a request may be signed already)."""
        first = make_request(tmp_path, "kiosk-1")
        assert stat.S_IMODE(first.key_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(first.key_path.parent.stat().st_mode) == 0o700
        second = make_request(tmp_path, "kiosk-1")
        assert (first.reused, second.reused) == (False, True)
        assert first.public_key_sha256() == second.public_key_sha256()
        third = make_request(tmp_path, "kiosk-1", new_key=True)
        assert third.public_key_sha256() != first.public_key_sha256()

    def test_the_request_is_one_the_ca_accepts(self, tmp_path):
        """The device's own request passes every check of the operator's side."""
        pending = make_request(tmp_path, "kiosk-1")
        assert check_csr(pending.request_pem.encode(), "kiosk-1").ignored_extensions == ()

    def test_a_pending_key_for_another_id_is_not_reused_silently(self, tmp_path):
        """Asking for another id while a key is pending needs --new-key."""
        make_request(tmp_path, "kiosk-1")
        with pytest.raises(PendingKeyError, match="pending for device 'kiosk-1'"):
            make_request(tmp_path, "kiosk-2")
        assert make_request(tmp_path, "kiosk-2", new_key=True).device_id == "kiosk-2"

    @pytest.mark.parametrize("device", ["+", "a/b", "control", ""])
    def test_unsafe_ids_get_no_request(self, tmp_path, device):
        """The device refuses to ask for an id the fleet would refuse."""
        with pytest.raises(PendingKeyError):
            make_request(tmp_path, device)
        assert not pending_files(tmp_path)[0].exists()

    def test_the_signed_bundle_pairs_with_the_pending_key(self, fleet, tmp_path):
        """enroll fills the bundle's missing key with the pending one and writes it 0600."""
        state = tmp_path / "state"
        pending = make_request(state, "kiosk-1")
        bundle = issue(fleet, "kiosk-1", tmp_path / "k.json", pending.request_pem.encode())
        enrollment = Enrollment.from_bundle(bundle)
        assert enrollment.tls_key is None
        with pytest.raises(EnrollmentError, match="has no key"):
            write_enrollment(state, enrollment, b"{}")
        paired = pair_pending_key(state, enrollment)
        assert paired.tls_key == pending.key_path.read_text()
        write_enrollment(state, paired, b"{}")
        clear_pending(state)
        assert not pending.key_path.exists()

    def test_a_certificate_for_another_key_is_refused(self, fleet, tmp_path):
        """A bundle answering another device's (or an older) request is not installed."""
        state = tmp_path / "state"
        make_request(state, "kiosk-1")
        elsewhere = make_request(tmp_path / "other", "kiosk-1")
        bundle = issue(fleet, "kiosk-1", tmp_path / "k.json", elsewhere.request_pem.encode())
        with pytest.raises(PendingKeyError, match="not for the key pending on this device"):
            pair_pending_key(state, Enrollment.from_bundle(bundle))

    def test_a_keyless_bundle_without_a_pending_key_is_refused(self, fleet, tmp_path):
        """No pending key here: the bundle was meant for another state directory."""
        elsewhere = make_request(tmp_path / "other", "kiosk-1")
        bundle = issue(fleet, "kiosk-1", tmp_path / "k.json", elsewhere.request_pem.encode())
        with pytest.raises(PendingKeyError, match="no key is pending"):
            pair_pending_key(tmp_path / "state", Enrollment.from_bundle(bundle))
