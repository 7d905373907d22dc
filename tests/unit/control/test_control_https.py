"""The control plane's HTTPS settings: the certificate and key go together, the base URL says
https, a certificate that cannot be loaded stops the start with a clear error, and fleet-init
writes the settings for an https:// control URL with a port."""

from __future__ import annotations

import time
import tomllib

import pytest

from edgelm_control.config import resolve_config
from edgelm_control.errors import ConfigError
from edgelm_control.service import https_context
from edgelm_provisioning.fleet_dir import listen_address
from edgelm_provisioning.fleet_init import init_fleet


class TestHttpsSettings:
    def test_the_certificate_and_key_go_together(self):
        """One without the other is an error that names both."""
        with pytest.raises(ConfigError, match="http_tls_cert and http_tls_key go together"):
            resolve_config(toml_data={"fleet": "acme", "http_tls_cert": "tls/server.pem"})

    def test_the_base_url_is_https_with_a_certificate(self, tmp_path):
        """Without a public_url, the URL devices are told is https://HOST:PORT."""
        config = resolve_config(
            toml_data={
                "fleet": "acme",
                "http": "127.0.0.1:8443",
                "http_tls_cert": "tls/server.pem",
                "http_tls_key": "tls/server-key.pem",
            },
            toml_dir=tmp_path,
        )
        assert config.http_tls_cert == tmp_path / "tls" / "server.pem"
        assert config.base_url == "https://127.0.0.1:8443"
        assert resolve_config(toml_data={"fleet": "acme"}).base_url.startswith("http://")

    def test_an_unloadable_certificate_stops_the_start(self, tmp_path):
        """A missing or broken file is a ConfigError naming it, not a traceback."""
        (tmp_path / "server.pem").write_text("not a certificate")
        config = resolve_config(
            toml_data={
                "fleet": "acme",
                "http_tls_cert": "server.pem",
                "http_tls_key": "missing-key.pem",
            },
            toml_dir=tmp_path,
        )
        with pytest.raises(ConfigError, match="cannot load the HTTPS certificate"):
            https_context(config)
        assert https_context(resolve_config(toml_data={"fleet": "acme"})) is None


class TestFleetInitHttps:
    @pytest.mark.parametrize(
        ("url", "listen", "tls"),
        [
            ("https://cp.example:8443", "0.0.0.0:8443", True),
            ("https://127.0.0.1:8443", "127.0.0.1:8443", True),
            ("https://cp.example", "127.0.0.1:8480", False),
            ("http://cp.example:8480", "0.0.0.0:8480", False),
        ],
    )
    def test_an_https_url_with_a_port_is_served_by_the_control_plane(
        self, tmp_path, url, listen, tls
    ):
        """https://HOST:PORT: the control plane listens there with its fleet certificate;
        https:// without a port stays behind a proxy; http:// is unchanged."""
        assert listen_address(url) == listen
        init_fleet(
            tmp_path / "f",
            fleet="acme",
            control_url=url,
            broker_url="mqtts://broker.example:8883",
            now=int(time.time()),
        )
        control = tmp_path / "f" / "control"
        data = tomllib.loads((control / "control.toml").read_text())
        assert data["http"] == listen
        assert ("http_tls_cert" in data) is tls
        if tls:
            config = resolve_config(toml_data=data, toml_dir=control)
            assert https_context(config) is not None
            assert config.base_url == url
