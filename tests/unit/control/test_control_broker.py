"""The control plane's broker URL: the shared parser, MQTT 3.1.1, and what 3.1.1 rules out."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelm_control.config import ControlConfig, parse_broker_url, resolve_config
from edgelm_control.errors import ConfigError
from edgelm_control.fleet.link import mqtt_settings
from edgelm_protocol.mqtt import MqttVersion
from edgelm_protocol.mqtt import parse_broker_url as shared_parser

BASE = Path("/srv/fleet/control")


def resolve(toml: dict[str, object], env: dict[str, str] | None = None) -> ControlConfig:
    return resolve_config(
        toml_data={"fleet": "acme", **toml}, env=env, toml_dir=BASE, cwd=Path("/home/op")
    )


class TestBrokerUrl:
    def test_the_control_plane_parses_as_the_protocol_package_does(self):
        """One parser: the config's broker is exactly what the shared parser returns."""
        url = "mqtts://cp:s%40cret@broker.example:8884?protocol=3.1.1"
        assert parse_broker_url(url) == shared_parser(url)

    def test_protocol_311_reaches_the_mqtt_settings(self):
        """?protocol=3.1.1 in control.toml makes the fleet link speak MQTT 3.1.1."""
        config = resolve({"broker_url": "mqtt://127.0.0.1:1884?protocol=3.1.1"})
        settings = mqtt_settings(
            config.broker,
            client_id=config.client_id,
            receive_maximum=config.mqtt_receive_maximum,
            session_expiry_s=config.mqtt_session_expiry_s,
        )
        assert config.broker.protocol_version is MqttVersion.V311
        assert str(config.broker) == "mqtt://127.0.0.1:1884?protocol=3.1.1"
        assert (settings.host, settings.port, settings.mqtt5) == ("127.0.0.1", 1884, False)
        assert (settings.clean_start, settings.manual_ack, settings.tls) == (False, True, None)

    def test_mqtt5_is_the_default_and_mqtts_brings_tls(self):
        """Without the option the link speaks MQTT 5; mqtts:// gives it a TLS context."""
        config = resolve({"broker_url": "mqtts://broker.example"})
        settings = mqtt_settings(
            config.broker, client_id="c", receive_maximum=10, session_expiry_s=60
        )
        assert (settings.mqtt5, settings.port, settings.tls is not None) == (True, 8883, True)

    @pytest.mark.parametrize(
        ("toml", "env"),
        [
            ({"broker_url": "mqtt://b?protocol=3.1.1", "shared_group": "cp"}, None),
            ({"broker_url": "mqtt://b?protocol=3.1.1"}, {"EDGELM_CONTROL_SHARED_GROUP": "cp"}),
            ({"shared_group": "cp"}, {"EDGELM_CONTROL_BROKER_URL": "mqtt://b?protocol=3.1.1"}),
        ],
    )
    def test_a_share_group_with_mqtt_311_is_refused_at_config_time(
        self, toml: dict[str, object], env: dict[str, str] | None
    ):
        """Shared subscriptions are MQTT 5 only: the pair is refused before anything starts,
        wherever each setting came from."""
        with pytest.raises(ConfigError, match=r"shared_group 'cp' needs MQTT 5.*protocol=3\.1\.1"):
            resolve(toml, env)

    def test_a_share_group_with_mqtt5_is_fine(self):
        config = resolve({"broker_url": "mqtt://b?protocol=5", "shared_group": "cp"})
        assert (config.shared_group, config.broker.mqtt5) == ("cp", True)

    @pytest.mark.parametrize(
        ("url", "needle"),
        [
            ("mqtt://b?protocol=4", "protocol must be 5 or 3.1.1"),
            ("mqtt://b?qos=1", "only query option is protocol"),
            ("mqtt://b/x", "no path"),
            ("mqtt://b:0", "port must be a number from 1 to 65535"),
        ],
    )
    def test_a_bad_url_names_its_source_and_problem(self, url: str, needle: str):
        """The ConfigError says which setting, from where, and what is wrong with it."""
        with pytest.raises(ConfigError) as caught:
            resolve({"broker_url": url})
        assert "config file key 'broker_url'" in str(caught.value)
        assert needle in str(caught.value)

    def test_the_password_stays_out_of_the_error(self):
        with pytest.raises(ConfigError) as caught:
            resolve({"broker_url": "mqtt://cp:hunter2@b/x"})
        assert "hunter2" not in str(caught.value)
