"""docs/control-plane.md keeps up with the code: every setting, endpoint and metric is there."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from edgelm_control.api.app import OPERATIONS
from edgelm_control.config import SETTINGS
from edgelm_control.metrics import ControlMetrics

DOC = (Path(__file__).parents[3] / "docs" / "control-plane.md").read_text()


def table_rows(doc: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in doc.splitlines()
        if line.startswith("| `")
    ]


def test_every_setting_has_a_row_with_its_variable() -> None:
    """A setting missing from the table is one nobody can find; its variable must match."""
    rows = {row[0]: row for row in table_rows(DOC)}
    for setting in SETTINGS:
        row = rows.get(f"`{setting.key}`")
        assert row is not None, f"setting {setting.key} is not documented"
        assert row[1] == f"`{setting.env}`", setting.key


def test_every_endpoint_is_in_the_api_table() -> None:
    """Each operation of the OpenAPI document has its row (method and path)."""
    rows = {(row[0], row[1]) for row in table_rows(DOC)}
    missing = [
        (op.method, op.path) for op in OPERATIONS if (f"`{op.method}`", f"`{op.path}`") not in rows
    ]
    assert not missing


def test_every_metric_is_documented() -> None:
    registry = CollectorRegistry()
    ControlMetrics(registry)
    names = {row[0] for row in table_rows(DOC)}
    missing = [f.name for f in registry.collect() if f"`{f.name}`" not in names]
    assert not missing
