"""fleet-init's broker URL goes through the protocol package's parser, less credentials."""

from __future__ import annotations

import pytest

from edgelm_provisioning.errors import InvalidValue
from edgelm_provisioning.fleet_dir import FleetConfig, check_broker_url


class TestFleetBrokerUrl:
    @pytest.mark.parametrize(
        "url",
        ["mqtt://127.0.0.1:1883?protocol=3.1.1", "mqtt://broker?protocol=5", "mqtts://[::1]:8883"],
    )
    def test_the_protocol_option_and_ipv6_pass_as_written(self, url: str):
        """?protocol= reaches fleet.toml, control.toml and every bundle as written."""
        assert check_broker_url(url) == url
        assert FleetConfig("acme", "http://127.0.0.1:8480", url).broker_url == url

    @pytest.mark.parametrize(
        ("url", "needle"),
        [
            ("mqtt://broker?protocol=3", "protocol must be 5 or 3.1.1"),
            ("mqtt://broker?x=1", "only query option is protocol"),
            ("mqtt://broker/topic", "no path"),
            ("mqtt://broker#frag", "no fragment"),
            ("mqtt://dev:pw@broker", "must not hold credentials"),
            ("http://broker", "mqtt://HOST[:PORT]"),
        ],
    )
    def test_anything_else_is_refused_naming_the_problem(self, url: str, needle: str):
        with pytest.raises(InvalidValue, match="broker_url") as caught:
            check_broker_url(url)
        assert needle in str(caught.value)
