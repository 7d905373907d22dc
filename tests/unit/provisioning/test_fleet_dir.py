"""The fleet directory's settings: URLs, the control plane's listen address, fleet.toml."""

from __future__ import annotations

import pytest

from edgelm_provisioning.errors import FleetDirError, InvalidValue
from edgelm_provisioning.fleet_dir import (
    PROXIED_LISTEN,
    FleetConfig,
    FleetDir,
    check_broker_url,
    check_control_url,
    listen_address,
)


class TestControlUrl:
    @pytest.mark.parametrize(
        ("url", "checked"),
        [
            ("http://127.0.0.1:8480", "http://127.0.0.1:8480"),
            ("https://cp.example/", "https://cp.example"),
            ("https://cp.example/edgelm/", "https://cp.example/edgelm"),
        ],
    )
    def test_http_urls_are_kept_without_a_trailing_slash(self, url, checked):
        """http and https URLs pass, with any trailing slash removed."""
        assert check_control_url(url) == checked

    @pytest.mark.parametrize(
        "url",
        [
            "ftp://cp.example",
            "cp.example:8480",
            "http://user:pw@cp.example",
            "http://cp.example?x=1",
            "http://cp example",
            "http://cp.example:99999",
            "http://",
        ],
    )
    def test_anything_else_is_refused(self, url):
        """Other schemes, credentials, queries, spaces and bad ports are refused."""
        with pytest.raises(InvalidValue):
            check_control_url(url)


class TestBrokerUrl:
    def test_mqtt_and_mqtts_pass(self):
        """mqtt:// and mqtts:// URLs with a host pass."""
        assert check_broker_url("mqtt://broker:1883") == "mqtt://broker:1883"
        assert check_broker_url("mqtts://broker:8883/") == "mqtts://broker:8883"

    @pytest.mark.parametrize(
        "url", ["http://broker:1883", "mqtt://dev:pw@broker", "mqtt://broker/topic"]
    )
    def test_credentials_paths_and_other_schemes_are_refused(self, url):
        """Credentials belong in each device's bundle, never in the fleet's broker URL."""
        with pytest.raises(InvalidValue):
            check_broker_url(url)


class TestListenAddress:
    @pytest.mark.parametrize(
        ("url", "listen"),
        [
            ("http://127.0.0.1:8480", "127.0.0.1:8480"),
            ("http://localhost:9000", "localhost:9000"),
            ("http://[::1]:8480", "[::1]:8480"),
            ("http://cp.example:8480", "0.0.0.0:8480"),
            ("http://10.0.0.5:8480", "0.0.0.0:8480"),
            ("https://cp.example", PROXIED_LISTEN),
            ("http://cp.example", PROXIED_LISTEN),
        ],
    )
    def test_the_address_follows_the_public_url(self, url, listen):
        """Loopback stays loopback, a public host listens on all, TLS means a proxy in front."""
        assert listen_address(url) == listen


class TestFleetConfig:
    def test_fleet_toml_reads_back(self, tmp_path):
        """A config written to fleet.toml loads back equal."""
        config = FleetConfig("acme", "http://cp:8480", "mqtt://broker:1883")
        (tmp_path / "fleet.toml").write_text(config.to_toml())
        assert FleetConfig.load(tmp_path / "fleet.toml") == config
        assert config.repository_url == "http://cp:8480/repository"

    @pytest.mark.parametrize("fleet", ["", "a/b", "+", "acme corp", "-acme"])
    def test_a_fleet_id_outside_the_alphabet_is_refused(self, fleet):
        """The fleet id becomes a topic level, so it uses the closed id alphabet."""
        with pytest.raises(InvalidValue):
            FleetConfig(fleet, "http://cp:8480", "mqtt://broker:1883")

    def test_a_missing_key_is_named(self, tmp_path):
        """A fleet.toml without broker_url says which key is missing."""
        (tmp_path / "fleet.toml").write_text('fleet = "acme"\ncontrol_url = "http://cp:1"\n')
        with pytest.raises(InvalidValue, match="broker_url"):
            FleetConfig.load(tmp_path / "fleet.toml")


class TestFleetDirOpen:
    def test_a_directory_without_fleet_toml_is_not_a_fleet(self, tmp_path):
        """Opening a folder that fleet-init did not make says so, with a hint."""
        with pytest.raises(FleetDirError) as caught:
            FleetDir.open(tmp_path)
        assert caught.value.reference == "not-a-fleet-dir"
        assert "fleet-init" in (caught.value.hint or "")
