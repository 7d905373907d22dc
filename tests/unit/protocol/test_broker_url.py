"""The one broker-URL parser that the agent, the control plane and provisioning share."""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_protocol.mqtt import (
    BrokerUrl,
    InvalidArgument,
    InvalidBrokerUrl,
    MqttSettings,
    MqttVersion,
    MqttWill,
    parse_broker_url,
)
from edgelm_protocol.mqtt.link import build_paho

V5, V311 = MqttVersion.V5, MqttVersion.V311
HOST_NAME = r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}"


def quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


class TestGoodUrls:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("mqtt://broker", BrokerUrl("broker", 1883)),
            ("mqtt://broker:1884", BrokerUrl("broker", 1884)),
            ("mqtts://broker", BrokerUrl("broker", 8883, tls=True)),
            ("mqtts://broker:9999/", BrokerUrl("broker", 9999, tls=True)),
            ("mqtt://127.0.0.1:1883", BrokerUrl("127.0.0.1", 1883)),
            ("mqtt://[::1]:1885", BrokerUrl("::1", 1885)),
            ("mqtt://[::1]", BrokerUrl("::1", 1883)),
            ("MQTT://Broker.Example", BrokerUrl("broker.example", 1883)),
            ("mqtt://broker:", BrokerUrl("broker", 1883)),  # urlsplit's empty port: default
            ("mqtt://cp@broker", BrokerUrl("broker", 1883, username="cp")),
            (
                "mqtts://cp:s%40cret@broker.example",
                BrokerUrl("broker.example", 8883, username="cp", password="s@cret", tls=True),
            ),
            ("mqtt://broker?protocol=5", BrokerUrl("broker", 1883)),
            ("mqtt://broker:1/?protocol=3.1.1", BrokerUrl("broker", 1, protocol_version=V311)),
            ("mqtt://broker?protocol=3%2E1%2E1", BrokerUrl("broker", protocol_version=V311)),
        ],
    )
    def test_parses_to_its_parts(self, url: str, expected: BrokerUrl):
        """Scheme, host, port (1883 or 8883 by default), user, password and protocol."""
        assert parse_broker_url(url) == expected

    def test_str_is_canonical_and_never_shows_the_password(self):
        """str() spells the port and protocol out and leaves the password out; so does repr."""
        broker = parse_broker_url("mqtt://cp:hunter2@[::1]?protocol=3.1.1")
        assert str(broker) == "mqtt://cp@[::1]:1883?protocol=3.1.1"
        assert "hunter2" not in repr(broker)
        assert str(parse_broker_url("mqtts://b")) == "mqtts://b:8883"

    @given(
        host=st.one_of(
            st.from_regex(
                r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True
            ),
            st.ip_addresses(v=4).map(str),
            st.ip_addresses(v=6).map(str),
        ),
        port=st.none() | st.integers(1, 65535),
        tls=st.booleans(),
        user=st.none() | st.text(min_size=1, max_size=20),
        password=st.none() | st.text(min_size=1, max_size=20),
        version=st.none() | st.sampled_from(list(MqttVersion)),
    )
    def test_any_well_formed_url_parses_back_to_its_parts(
        self,
        host: str,
        port: int | None,
        tls: bool,
        user: str | None,
        password: str | None,
        version: MqttVersion | None,
    ):
        """Built from parts (user and password percent-encoded), a URL parses to those parts,
        and its str() parses to the same broker less the password."""
        if user is None:
            password = None
        userinfo = "" if user is None else quote(user)
        if password is not None:
            userinfo += ":" + quote(password)
        url = (
            f"{'mqtts' if tls else 'mqtt'}://"
            + (f"{userinfo}@" if userinfo else "")
            + (f"[{host}]" if ":" in host else host)
            + (f":{port}" if port is not None else "")
            + (f"?protocol={version}" if version is not None else "")
        )
        broker = parse_broker_url(url)
        assert broker == BrokerUrl(
            host=host,
            port=port or (8883 if tls else 1883),
            username=user,
            password=password,
            tls=tls,
            protocol_version=version or V5,
        )
        again = parse_broker_url(str(broker))
        assert again == BrokerUrl(
            broker.host, broker.port, broker.username, None, broker.tls, broker.protocol_version
        )


class TestBadUrls:
    @pytest.mark.parametrize(
        ("url", "problem"),
        [
            ("", "empty"),
            ("broker:1883", "scheme must be mqtt:// or mqtts://, not broker://"),
            ("http://broker", "not http://"),
            ("tcp://broker:1883", "not tcp://"),
            ("mqtt://", "host is missing"),
            ("mqtt:///path", "host is missing"),
            ("mqtt://[::1", "host is malformed"),
            ("mqtt://broker:0", "port must be a number from 1 to 65535"),
            ("mqtt://broker:65536", "port must be a number"),
            ("mqtt://broker:http", "port must be a number"),
            ("mqtt://broker:1883:1", "port must be a number"),
            ("mqtt://broker/topic", "no path, got '/topic'"),
            ("mqtt://broker#x", "no fragment"),
            ("mqtt://broker?protocol=4", "protocol must be 5 or 3.1.1, got '4'"),
            ("mqtt://broker?protocol=3.1", "protocol must be 5 or 3.1.1"),
            ("mqtt://broker?protocol=", "protocol must be 5 or 3.1.1, got ''"),
            ("mqtt://broker?protocol", "is not protocol=5|3.1.1"),
            ("mqtt://broker?version=5", "only query option is protocol=5|3.1.1, got version"),
            ("mqtt://broker?protocol=5&protocol=3.1.1", "more than once"),
            ("mqtt://:pw@broker", "a password needs a user name"),
            ("mqtt://bro ker", "spaces or control characters"),
            ("mqtt://broker:1883\n", "spaces or control characters"),
        ],
    )
    def test_refused_naming_the_problem(self, url: str, problem: str):
        """Each refusal says what is wrong with the URL and what shape is expected."""
        with pytest.raises(InvalidBrokerUrl) as caught:
            parse_broker_url(url)
        assert problem in str(caught.value)
        assert problem in caught.value.problem or problem == "empty"
        assert "expected mqtt[s]://" in str(caught.value)
        assert isinstance(caught.value, ValueError)  # config loaders catch ValueError

    def test_not_a_string_is_refused(self):
        """A TOML integer or a None is refused as such, not crashed on."""
        with pytest.raises(InvalidBrokerUrl, match="is a string"):
            parse_broker_url(1883)

    @pytest.mark.parametrize(
        "url",
        [
            "mqtt://cp:hunter2@broker:99999",
            "mqtt://cp:hunter2@broker/x",
            "mqtt://cp:hunter2@broker?protocol=6",
            "http://cp:hunter2@broker",
        ],
    )
    def test_the_password_never_reaches_the_message(self, url: str):
        """The error quotes the URL with its password as ***."""
        with pytest.raises(InvalidBrokerUrl) as caught:
            parse_broker_url(url)
        assert "hunter2" not in str(caught.value)
        assert "cp:***@broker" in str(caught.value)

    @given(st.text(max_size=60) | st.from_regex(r"mqtts?://[^\s]{0,40}", fullmatch=True))
    def test_any_text_parses_or_raises_invalid_broker_url(self, url: str):
        """No input makes the parser raise anything else; what it accepts is well formed."""
        try:
            broker = parse_broker_url(url)
        except InvalidBrokerUrl:
            return
        assert broker.host
        assert 0 < broker.port <= 65535
        assert broker.password is None or broker.username is not None


class TestProtocolVersionSetting:
    def test_settings_take_the_version_from_the_enum_or_its_spelling(self):
        """MqttSettings accepts MqttVersion or its URL spelling, and refuses anything else."""
        assert MqttSettings(host="b", client_id="d").protocol_version is V5
        assert MqttSettings(host="b", client_id="d", protocol_version="3.1.1").mqtt5 is False  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument) as caught:
            MqttSettings(host="b", client_id="d", protocol_version="4")  # type: ignore[arg-type]
        assert caught.value.name == "protocol_version"

    def test_paho_client_speaks_the_version_asked_for(self):
        """3.1.1: paho's MQTTv311 with the clean-session flag from clean_start, no CONNECT
        properties; 5: MQTTv5 with session expiry and receive maximum."""
        will = MqttWill(topic="t/w", payload=b"gone")
        v311 = build_paho(MqttSettings(host="b", client_id="d", protocol_version=V311, will=will))
        v5 = build_paho(MqttSettings(host="b", client_id="d", receive_maximum=7))
        assert (v311.protocol, v311._clean_session, v311._connect_properties) == (4, False, None)
        assert v5.protocol == 5
        properties: Any = v5._connect_properties
        assert (properties.ReceiveMaximum, properties.SessionExpiryInterval) == (7, 604_800)
        cleaning = build_paho(
            MqttSettings(host="b", client_id="d", protocol_version=V311, clean_start=True)
        )
        assert cleaning._clean_session is True
