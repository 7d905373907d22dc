"""Where the operator CLI's URL and token come from: flag, then environment, then fleet dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelm_provisioning.errors import InvalidValue, MissingSetting
from edgelm_provisioning.fleet_init import init_fleet
from edgelm_provisioning.settings import resolve_settings


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    root = tmp_path / "acme"
    init_fleet(
        root,
        fleet="acme",
        control_url="http://fleet-toml:8480",
        broker_url="mqtt://127.0.0.1:1883",
        now=0,
    )
    return root


ENV = {"EDGELM_CONTROL_URL": "http://from-env:1", "EDGELM_CONTROL_TOKEN": "env-token"}


class TestResolveSettings:
    def test_flags_win(self, fleet_dir):
        """--control and --token beat the environment and the fleet dir."""
        settings = resolve_settings(
            control="http://flag:1", token="flag-token", fleet_dir=fleet_dir, env=ENV
        )
        assert (settings.control_url, settings.token) == ("http://flag:1", "flag-token")
        assert (settings.control_from, settings.token_from) == ("--control", "--token")

    def test_the_environment_beats_the_fleet_dir(self, fleet_dir):
        """EDGELM_CONTROL_URL and EDGELM_CONTROL_TOKEN beat fleet.toml and operator-token."""
        settings = resolve_settings(control=None, token=None, fleet_dir=fleet_dir, env=ENV)
        assert (settings.control_url, settings.token) == ("http://from-env:1", "env-token")

    def test_the_fleet_dir_is_the_last_default(self, fleet_dir):
        """With nothing else, fleet.toml's URL and the operator-token file are used."""
        settings = resolve_settings(control=None, token=None, fleet_dir=fleet_dir, env={})
        token = (fleet_dir / "operator-token").read_text().strip()
        assert (settings.control_url, settings.token) == ("http://fleet-toml:8480", token)
        assert settings.fleet is not None

    def test_no_url_anywhere_is_missing(self):
        """Without flag, variable or fleet dir, the URL is a MissingSetting with a hint."""
        with pytest.raises(MissingSetting) as caught:
            resolve_settings(control=None, token="t", fleet_dir=None, env={})
        assert caught.value.reference == "no-control-url"

    def test_no_token_anywhere_is_missing(self):
        """A URL without any token is a MissingSetting for the token."""
        with pytest.raises(MissingSetting) as caught:
            resolve_settings(control="http://cp:1", token=None, fleet_dir=None, env={})
        assert caught.value.reference == "no-token"

    def test_a_revoked_operator_token_file_is_not_used(self, fleet_dir):
        """With operator-token removed (revoked), the fleet dir gives no token."""
        (fleet_dir / "operator-token").unlink()
        with pytest.raises(MissingSetting):
            resolve_settings(control=None, token=None, fleet_dir=fleet_dir, env={})

    @pytest.mark.parametrize("token", ["has space", "line\nbreak", "\t"])
    def test_a_token_that_cannot_be_a_header_is_refused(self, token):
        """A token with spaces or control characters is refused before any request."""
        with pytest.raises(MissingSetting):
            resolve_settings(control="http://cp:1", token=token, fleet_dir=None, env={})

    def test_a_bad_url_names_where_it_came_from(self):
        """An invalid URL from the environment is refused, naming the variable."""
        with pytest.raises(InvalidValue, match="EDGELM_CONTROL_URL"):
            resolve_settings(
                control=None, token="t", fleet_dir=None, env={"EDGELM_CONTROL_URL": "cp:8480"}
            )
