"""The agent's MQTT settings come from its bundle's broker URL, through the shared parser."""

from __future__ import annotations

import pytest

from edgelm_agent.config import AgentConfig
from edgelm_agent.enrollment import Enrollment
from edgelm_agent.sync.service import mqtt_settings
from edgelm_protocol.mqtt import InvalidBrokerUrl, MqttVersion

BUNDLE = ("kiosk-1", "pw")  # the bundle's per-device user and password


def enrollment(url: str, credentials: tuple[str, str] | None = BUNDLE) -> Enrollment:
    username, password = credentials or (None, None)
    return Enrollment(
        fleet="acme",
        device_id="kiosk-1",
        hardware_class="x86",
        broker_url=url,
        control_url="http://127.0.0.1:8480",
        repository_url="http://127.0.0.1:8480/repository",
        director_keys=("unused here",),
        broker_username=username,
        broker_password=password,
    )


class TestAgentMqttSettings:
    @pytest.mark.parametrize(
        ("url", "host", "port", "version"),
        [
            ("mqtt://127.0.0.1:1884", "127.0.0.1", 1884, MqttVersion.V5),
            ("mqtt://broker.lan", "broker.lan", 1883, MqttVersion.V5),
            ("mqtts://broker.lan", "broker.lan", 8883, MqttVersion.V5),
            ("mqtt://[::1]:1885/", "::1", 1885, MqttVersion.V5),
            ("mqtt://127.0.0.1:1884?protocol=3.1.1", "127.0.0.1", 1884, MqttVersion.V311),
        ],
    )
    def test_host_port_and_protocol_come_from_the_url(
        self, url: str, host: str, port: int, version: MqttVersion
    ):
        """The bundle's URL sets where and how; the device id is the client id."""
        settings = mqtt_settings(AgentConfig(), enrollment(url))
        assert (settings.host, settings.port, settings.protocol_version) == (host, port, version)
        assert (settings.client_id, settings.username, settings.password) == (
            "kiosk-1",
            "kiosk-1",
            "pw",
        )
        assert settings.session_expiry_s == AgentConfig().mqtt_session_expiry_s

    def test_url_credentials_serve_only_when_the_bundle_has_none(self):
        """Per-device credentials win; a URL's user and password fill in without them."""
        with_bundle = mqtt_settings(AgentConfig(), enrollment("mqtt://u:p@b"))
        without = mqtt_settings(AgentConfig(), enrollment("mqtt://u:p@b", None))
        assert (with_bundle.username, with_bundle.password) == ("kiosk-1", "pw")
        assert (without.username, without.password) == ("u", "p")

    @pytest.mark.parametrize(
        "url", ["mqtt://b/x", "tcp://b:1883", "mqtt://b:port", "mqtt://b?protocol=4"]
    )
    def test_a_bad_url_raises_naming_the_problem(self, url: str):
        """What the old inline split turned into a bad host or an int() crash is now refused
        with the URL's problem named."""
        with pytest.raises(InvalidBrokerUrl, match="broker URL"):
            mqtt_settings(AgentConfig(), enrollment(url))
