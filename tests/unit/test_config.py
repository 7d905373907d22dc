"""Agent configuration: precedence, parsing and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelm_agent.config import AgentConfig, HttpListen, load_config, parse_http, resolve_config
from edgelm_agent.errors import ConfigError


class TestResolveConfig:
    def test_defaults_are_the_documented_ones(self):
        """With no sources, the documented defaults apply."""
        config = resolve_config()
        assert config == AgentConfig()
        assert config.http == HttpListen("127.0.0.1", 8470)
        assert config.socket_path == Path("/run/edgelm/agent.sock")
        assert config.state_dir == Path("/var/lib/edgelm")

    def test_env_overrides_file_and_flags_override_env(self):
        """Precedence is defaults < TOML < environment < flags."""
        config = resolve_config(
            toml_data={"max_queue": 3, "context_length": 1024, "threads": 1},
            env={"EDGELM_MAX_QUEUE": "5", "EDGELM_CONTEXT_LENGTH": "2048"},
            flags={"max_queue": "7"},
        )
        assert config.max_queue == 7
        assert config.context_length == 2048
        assert config.threads == 1

    def test_none_flags_do_not_override(self):
        """A flag the user did not pass (None) leaves lower sources in place."""
        config = resolve_config(env={"EDGELM_MAX_QUEUE": "5"}, flags={"max_queue": None})
        assert config.max_queue == 5

    def test_bad_value_names_its_source(self):
        """An invalid value says which source and which setting it came from."""
        with pytest.raises(ConfigError, match="EDGELM_MAX_QUEUE"):
            resolve_config(env={"EDGELM_MAX_QUEUE": "-1"})
        with pytest.raises(ConfigError, match="--context-length"):
            resolve_config(flags={"context_length": "lots"})

    @pytest.mark.parametrize(
        ("toml", "key"),
        [
            ({"shutdown_grace_s": 10**400}, "shutdown_grace_s"),
            ({"http_idle_timeout_s": 10**400}, "http_idle_timeout_s"),
            ({"context_length": (1 << 20) + 1}, "context_length"),
            ({"max_queued_jobs": 0}, "max_queued_jobs"),
        ],
    )
    def test_out_of_range_numbers_are_a_clear_error(self, toml, key):
        """A number too large for a float, or past a setting's bound, is a ConfigError naming
        the setting, not a traceback."""
        with pytest.raises(ConfigError, match=key):
            resolve_config(toml_data=toml)

    def test_unknown_toml_key_is_refused(self):
        """A typo in the config file is an error, not silently ignored."""
        with pytest.raises(ConfigError, match="max_queeu"):
            resolve_config(toml_data={"max_queeu": 3})

    def test_http_off_disables_the_listener(self):
        """--http off turns the TCP listener off."""
        assert resolve_config(flags={"http": "off"}).http is None

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("127.0.0.1:9000", HttpListen("127.0.0.1", 9000)),
            ("[::1]:8470", HttpListen("::1", 8470)),
            ("localhost:0", HttpListen("localhost", 0)),
        ],
    )
    def test_parse_http(self, raw, expected):
        """HOST:PORT parses, including bracketed IPv6."""
        assert parse_http(raw) == expected

    @pytest.mark.parametrize("raw", ["8470", ":8470", "host:99999", "host:port"])
    def test_parse_http_rejects_garbage(self, raw):
        """Malformed listen addresses raise ValueError."""
        with pytest.raises(ValueError):  # noqa: PT011  # the message varies by the fault
            parse_http(raw)

    def test_loopback_detection(self):
        """Only loopback addresses and localhost count as loopback."""
        assert HttpListen("127.0.0.1", 1).is_loopback
        assert HttpListen("::1", 1).is_loopback
        assert HttpListen("localhost", 1).is_loopback
        assert not HttpListen("0.0.0.0", 1).is_loopback  # noqa: S104
        assert not HttpListen("192.168.1.10", 1).is_loopback


class TestLoadConfig:
    def test_reads_toml_file(self, tmp_path, monkeypatch):
        """load_config reads the TOML file given with --config."""
        monkeypatch.delenv("EDGELM_CONFIG", raising=False)
        path = tmp_path / "agent.toml"
        path.write_text('max_queue = 2\nhttp = "127.0.0.1:9999"\n')
        config = load_config(path, {})
        assert config.max_queue == 2
        assert config.http == HttpListen("127.0.0.1", 9999)

    def test_invalid_toml_is_a_config_error(self, tmp_path):
        """A broken config file gives a ConfigError naming the file."""
        path = tmp_path / "agent.toml"
        path.write_text("max_queue = = 2\n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_config(path, {})

    def test_missing_file_is_a_config_error(self, tmp_path):
        """A config path that does not exist gives a ConfigError, not a traceback."""
        with pytest.raises(ConfigError, match="cannot read config file"):
            load_config(tmp_path / "nope.toml", {})
