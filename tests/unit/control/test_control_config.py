"""The control plane's configuration: control.toml < EDGELM_CONTROL_* < flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_control.config import (
    SETTINGS,
    BrokerAddress,
    ControlConfig,
    HttpListen,
    parse_broker_url,
    parse_http,
    resolve_config,
)
from edgelm_control.errors import ConfigError

BASE = Path("/srv/fleet/control")


def resolve(**kwargs: object) -> ControlConfig:
    kwargs.setdefault("toml_data", {"fleet": "acme"})
    kwargs.setdefault("toml_dir", BASE)
    kwargs.setdefault("cwd", Path("/home/op"))
    return resolve_config(**kwargs)  # type: ignore[arg-type]


class TestResolve:
    def test_defaults_put_everything_beside_control_toml(self):
        """Without settings, the store, repository, keys and tokens live in data_dir, which
        is the config file's folder."""
        config = resolve()
        assert config.data_dir == BASE
        assert config.db == f"sqlite:///{BASE / 'control.db'}"
        assert (config.repository_dir, config.keys_dir, config.tokens_file) == (
            BASE / "repository",
            BASE / "keys",
            BASE / "tokens.json",
        )
        assert config.http == HttpListen("127.0.0.1", 8480)
        assert config.client_id == "control-acme-0"
        assert config.desired_expiry_s == 7 * 86400

    def test_the_layout_spec_control_toml_reads_as_written(self):
        """The file fleet-init writes resolves its relative paths against its own folder."""
        config = resolve(
            toml_data={
                "fleet": "acme",
                "http": "127.0.0.1:8480",
                "public_url": "http://127.0.0.1:8480",
                "db": "sqlite:///control.db",
                "broker_url": "mqtt://127.0.0.1:1883",
                "repository_dir": "repository",
                "keys_dir": "keys",
                "tokens_file": "tokens.json",
            }
        )
        assert config.repository_dir == BASE / "repository"
        assert config.base_url == "http://127.0.0.1:8480"
        assert config.broker == BrokerAddress("127.0.0.1", 1883)

    def test_flags_beat_the_environment_which_beats_the_file(self):
        """Precedence is file < environment < flags, and env or flag paths resolve from cwd."""
        config = resolve(
            toml_data={"fleet": "acme", "http": "0.0.0.0:1", "db": "sqlite:///a.db"},
            env={"EDGELM_CONTROL_HTTP": "0.0.0.0:2", "EDGELM_CONTROL_DB": "sqlite:///b.db"},
            flags={"http": "0.0.0.0:3"},
        )
        assert config.http.port == 3
        assert config.db == "sqlite:////home/op/b.db"

    def test_postgresql_urls_pass_unchanged(self):
        """A postgresql:// URL selects PostgreSQL as given."""
        url = "postgresql://edgelm@db.internal/fleet"
        assert resolve(flags={"db": url}).db == url

    @pytest.mark.parametrize(
        ("toml", "needle"),
        [
            ({}, "fleet is not set"),
            ({"fleet": "a/b"}, "fleet"),
            ({"fleet": "acme", "colour": "red"}, "unknown setting(s) colour"),
            ({"fleet": "acme", "http": "8480"}, "HOST:PORT"),
            ({"fleet": "acme", "broker_url": "http://x"}, "mqtt://"),
            ({"fleet": "acme", "db": "mysql://x/y"}, "sqlite"),
            ({"fleet": "acme", "desired_expiry_s": 0}, "positive integer"),
            ({"fleet": "acme", "shared_group": "a/b"}, "share group"),
            ({"fleet": "acme", "desired_resign_before_s": 700000}, "below desired_expiry_s"),
        ],
    )
    def test_a_bad_setting_names_its_source_and_what_is_expected(
        self, toml: dict[str, object], needle: str
    ):
        """Every refusal is a ConfigError whose message points at the setting."""
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            resolve(toml_data=toml)

    def test_every_setting_has_an_environment_variable(self):
        """Each key is also EDGELM_CONTROL_<KEY>."""
        assert all(s.env == "EDGELM_CONTROL_" + s.key.upper() for s in SETTINGS)
        config = resolve(env={"EDGELM_CONTROL_SHARED_GROUP": "cp"})
        assert config.shared_group == "cp"


class TestParsers:
    def test_broker_urls_carry_credentials_and_tls(self):
        """User and password come from the URL; mqtts defaults to 8883 and TLS."""
        broker = parse_broker_url("mqtts://cp:s%40cret@broker.example")
        assert (broker.host, broker.port, broker.username, broker.password, broker.tls) == (
            "broker.example",
            8883,
            "cp",
            "s@cret",
            True,
        )
        assert "s@cret" not in str(broker)
        assert "s@cret" not in repr(broker)

    @given(st.integers(0, 65535))
    def test_any_port_round_trips(self, port: int):
        """HOST:PORT parses for every port, IPv6 hosts in brackets."""
        assert parse_http(f"[::1]:{port}") == HttpListen("::1", port)
        assert str(parse_http(f"127.0.0.1:{port}")) == f"127.0.0.1:{port}"
