"""Fixtures: a fleet made by fleet-init, the fake control plane serving it, and the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from edgelm_provisioning.fleet_cmd import fleet
from edgelm_provisioning.fleet_dir import FleetConfig, FleetDir
from edgelm_provisioning.fleet_init import init_fleet
from edgelm_provisioning.provision_cmd import provision
from tests.integration.provisioning.fake_control_plane import FakeControlPlane

#: The CLI must not pick up an operator's real settings from the test's environment.
CLEAN_ENV: dict[str, str | None] = {"EDGELM_CONTROL_URL": None, "EDGELM_CONTROL_TOKEN": None}


@pytest.fixture
def fleet_dir(tmp_path: Path) -> FleetDir:
    root = tmp_path / "acme"
    init_fleet(
        root,
        fleet="acme",
        control_url="http://127.0.0.1:8480",
        broker_url="mqtt://127.0.0.1:1883",
        now=int(time.time()),
    )
    return FleetDir.open(root)


@pytest.fixture
def control_plane(fleet_dir: FleetDir) -> Iterator[FakeControlPlane]:
    """The fake control plane serving the fleet's control/ folder; fleet.toml points at it."""
    fake = FakeControlPlane(fleet_dir.paths.control_dir)
    url = fake.start()
    config = fleet_dir.config
    fleet_dir.paths.fleet_toml.write_text(
        FleetConfig(config.fleet, url, config.broker_url).to_toml()
    )
    yield fake
    fake.stop()


def invoke(
    group: click.Group, *args: str | Path, env: Mapping[str, str | None] | None = None
) -> Result:
    runner = CliRunner()
    return runner.invoke(group, [str(a) for a in args], env={**CLEAN_ENV, **(env or {})})


def run_fleet(*args: str | Path, env: Mapping[str, str | None] | None = None) -> Result:
    return invoke(fleet, *args, env=env)


def run_provision(*args: str | Path) -> Result:
    return invoke(provision, *args)


def ok_json(result: Result) -> Any:
    """The one JSON document a successful ``--json`` command printed."""
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def error_json(result: Result) -> dict[str, Any]:
    """The error object a failed ``--json`` command printed (exit status 1)."""
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    error: dict[str, Any] = json.loads(result.stdout)["error"]
    return error
