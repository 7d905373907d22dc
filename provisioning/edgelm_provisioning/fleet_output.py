"""How ``edgelm fleet`` shows the control plane's answers to a person: rich tables and grids.

Pure: JSON values in, rich renderables out. Everything is read with ``.get``, and a field the
server does not send shows as ``-``: the REST resources will gain fields, and a table must not
break on a newer server. ``--json`` prints the answers as they came instead.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

MISSING = "-"


def scalar(value: Any) -> str:
    """One cell: ``-`` for null, ``k=v`` lists for flat string maps, compact JSON otherwise."""
    if value is None or value == "":
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values()):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or MISSING
    if isinstance(value, Mapping | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def when(value: Any) -> str:
    """A time as the server sent it: Unix seconds (or ms) shown in UTC, text as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return scalar(value)
    seconds = value / 1000 if value > 10**11 else value  # milliseconds since the epoch
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def model_ref(value: Any) -> str:
    """A model as ``name@version``, from a string or a ModelRef object."""
    if isinstance(value, Mapping) and "name" in value:
        return f"{value.get('name')}@{value.get('version', '?')}"
    return scalar(value)


def rows_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    *,
    title: str | None = None,
) -> Table:
    """A table of ``rows`` with ``columns`` given as (key, header) pairs."""
    table = Table(*(header for _, header in columns), title=title, title_justify="left")
    for row in rows:
        table.add_row(*(_cell(row, key) for key, _ in columns))
    return table


def _cell(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if key in ("last_seen", "created_at", "updated_at", "issued_at", "ts_ms", "at", "revoked_at"):
        return when(value)
    if key in ("active_model", "active", "previous", "model"):
        return model_ref(value)
    if key == "length" and isinstance(value, int):
        return f"{value / 1e6:.1f} MB"
    if key == "sha256" and isinstance(value, str):
        return value[:12]
    return scalar(value)


def generic_table(rows: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Table:
    """Every key any row has, in first-seen order: for answers without a fixed shape."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return rows_table(rows, [(k, k) for k in keys], title=title)


def key_values(obj: Mapping[str, Any], *, skip: Iterable[str] = ()) -> Table:
    """A two-column grid of an object's scalar fields (lists of objects are shown apart)."""
    skipped = set(skip)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in obj.items():
        if key in skipped or _is_row_list(value):
            continue
        grid.add_row(key, _cell(obj, key))
    return grid


def _is_row_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


DEVICE_COLUMNS = (
    ("id", "device"),
    ("hardware_class", "class"),
    ("labels", "labels"),
    ("presence", "presence"),
    ("last_seen", "last seen"),
    ("agent_version", "agent"),
    ("active_model", "active model"),
    ("applied_sequence", "seq"),
    ("revoked_at", "revoked"),
)
MODEL_COLUMNS = (
    ("name", "name"),
    ("version", "version"),
    ("format", "format"),
    ("quantization", "quant"),
    ("context_length", "context"),
    ("length", "size"),
    ("sha256", "sha256"),
)
ROLLOUT_LIST_COLUMNS = (
    ("id", "rollout"),
    ("model", "model"),
    ("state", "state"),
    ("created_at", "created"),
    ("counts", "devices by state"),
)


def device_detail(device: Mapping[str, Any]) -> RenderableType:
    """One device: its fields, then each list it carries (events, telemetry) as a table."""
    parts: list[RenderableType] = [key_values(device)]
    for key, value in device.items():
        if _is_row_list(value):
            parts.append(generic_table(value, title=key.replace("_", " ")))
    return Group(*parts)


def job_detail(job: Mapping[str, Any]) -> RenderableType:
    """A remote job: its fields, then each device's state with its answer or error."""
    entries = job.get("devices") or job.get("results") or []
    table = Table("device", "state", "answer or error", title="devices", title_justify="left")
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, Mapping):
            continue
        table.add_row(
            scalar(entry.get("device") or entry.get("id")),
            scalar(entry.get("state")),
            answer_text(entry),
        )
    return Group(key_values(job, skip=("devices", "results")), table)


def answer_text(entry: Mapping[str, Any]) -> Text:
    """The first choice's text of an OpenAI answer, or the error in red."""
    error = entry.get("error")
    if isinstance(error, Mapping):
        return Text(f"{error.get('code', 'error')}: {error.get('message', '')}", style="red")
    result = entry.get("result")
    if isinstance(result, Mapping):
        choices = result.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
            choice = choices[0]
            message = choice.get("message")
            if isinstance(message, Mapping) and isinstance(message.get("content"), str):
                return Text(message["content"])
            if isinstance(choice.get("text"), str):
                return Text(choice["text"])
        return Text(scalar(result))
    return Text(MISSING)
