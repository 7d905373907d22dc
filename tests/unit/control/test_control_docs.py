"""docs/control-plane.md keeps up with the code: every setting (with its default), endpoint and
metric is there."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from edgelm_control.api.app import OPERATIONS
from edgelm_control.config import (
    DEFAULT_DATA_DIR,
    SETTINGS,
    BrokerAddress,
    ControlConfig,
    HttpListen,
    resolve_config,
)
from edgelm_control.metrics import ControlMetrics

DOC = (Path(__file__).parents[3] / "docs" / "control-plane.md").read_text()


def table_rows(doc: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in doc.splitlines()
        if line.startswith("| `")
    ]


def settings_rows() -> dict[str, list[str]]:
    section = DOC.split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    return {row[0].strip("`"): row for row in table_rows(section)}


def test_every_setting_has_a_row_with_its_variable() -> None:
    """A setting missing from the table is one nobody can find; its variable must match."""
    rows = settings_rows()
    for setting in SETTINGS:
        row = rows.get(setting.key)
        assert row is not None, f"setting {setting.key} is not documented"
        assert len(row) == 4, (
            f"{setting.key}: {len(row)} cells, not key|environment|default|meaning"
        )
        assert row[1] == f"`{setting.env}`", setting.key


def test_every_documented_setting_exists() -> None:
    stale = set(settings_rows()) - {setting.key for setting in SETTINGS}
    assert not stale


def test_plain_defaults_are_the_real_ones() -> None:
    """A default written in the table is the dataclass's; unset ones say so."""
    defaults = ControlConfig()
    for setting in SETTINGS:
        value = getattr(defaults, setting.field)
        cell = settings_rows()[setting.key][2]
        if value is None:
            assert cell == "unset", setting.key
        elif isinstance(value, int | float | HttpListen | BrokerAddress) or (
            isinstance(value, str) and value
        ):
            assert cell == f"`{value}`", setting.key


def test_computed_defaults_are_the_real_ones() -> None:
    """The fleet is required; the database and the files default to places in data_dir,
    which is the config file's folder, else /var/lib/edgelm-control."""
    rows = settings_rows()
    assert rows["fleet"][2] == "required"
    assert rows["data_dir"][2] == f"the config file's folder, else `{DEFAULT_DATA_DIR}`"
    from_file = resolve_config(toml_data={"fleet": "acme"}, toml_dir=Path("/srv/cp"))
    assert from_file.data_dir == Path("/srv/cp")
    without_file = resolve_config(env={"EDGELM_CONTROL_FLEET": "acme"})
    assert without_file.data_dir == DEFAULT_DATA_DIR
    assert rows["db"][2] == "`sqlite:///control.db`"
    assert from_file.db == "sqlite:////srv/cp/control.db"
    for key in ("repository_dir", "keys_dir", "tokens_file"):
        relative = getattr(from_file, key).relative_to(from_file.data_dir)
        assert rows[key][2] == f"`{{data_dir}}/{relative}`", key


def test_every_endpoint_is_in_the_api_table() -> None:
    """Each operation of the OpenAPI document has its row (method and path)."""
    rows = {(row[0], row[1]) for row in table_rows(DOC)}
    missing = [
        (op.method, op.path) for op in OPERATIONS if (f"`{op.method}`", f"`{op.path}`") not in rows
    ]
    assert not missing


def test_every_metric_is_documented_by_its_exposed_name() -> None:
    """A counter ``x`` is scraped as ``x_total``: the table uses the names a query needs."""
    registry = CollectorRegistry()
    ControlMetrics(registry)
    section = DOC.split("\n## Health and metrics", 1)[1].split("\n## ", 1)[0]
    documented = {row[0].strip("`"): row[1] for row in table_rows(section)}
    defined = {
        (f"{f.name}_total" if f.type == "counter" else f.name): f.type for f in registry.collect()
    }
    assert set(documented) == set(defined)
    assert documented == defined
