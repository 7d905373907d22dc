"""A rollout as the operator sees it: waves with verdicts, devices with states and reasons.

Pure: the control plane's rollout object (``GET /api/v1/rollouts/{id}``) in, rich renderables
or lines of text out. ``rollouts show`` and the live ``rollouts watch`` draw the same view;
when the output is not a terminal (CI logs, a pipe), ``watch`` prints :func:`changes` instead:
one line per state change, so a log reads as the rollout's history.

The rollout object is read as the control plane documents it::

    {"id", "model", "state", "reason"?,
     "waves": [{"index", "devices": [id...], "verdict": "running"|"passed"|"failed"|null,
                "reason"}],
     "devices": [{"id", "wave", "state", "reason"}]}

with ``device`` accepted for a device row's ``id`` and ``state`` for a wave's ``verdict``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from edgelm_provisioning.fleet_output import scalar

#: Rollout states after which ``watch`` stops, with its exit status for each.
FINAL_EXIT = {"completed": 0, "failed": 3, "aborted": 3}
#: States in which the rollout waits for the operator (resume or abort).
WAITING_FOR_OPERATOR = frozenset({"halted", "paused"})
FAILED_DEVICE_STATES = frozenset({"failed", "timed_out"})
BUSY_DEVICE_STATES = frozenset({"pending", "downloading", "activating", "rolling_back"})

_STATE_STYLE = {
    "succeeded": "green",
    "completed": "green",
    "passed": "green",
    "failed": "red",
    "timed_out": "red",
    "aborted": "red",
    "rolled_back": "yellow",
    "rolling_back": "yellow",
    "halted": "yellow",
    "paused": "yellow",
    "cancelled": "dim",
    "superseded": "dim",
    "expired": "dim",
    "waiting": "dim",
}


def styled(state: Any) -> Text:
    text = scalar(state)
    return Text(text, style=_STATE_STYLE.get(text, ""))


def device_id(row: Mapping[str, Any]) -> str:
    return scalar(row.get("id") or row.get("device") or row.get("device_id"))


def devices_of(rollout: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rows = rollout.get("devices")
    return [r for r in rows if isinstance(r, Mapping)] if isinstance(rows, list) else []


def waves_of(rollout: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    waves = rollout.get("waves")
    return [w for w in waves if isinstance(w, Mapping)] if isinstance(waves, list) else []


def verdict_of(wave: Mapping[str, Any]) -> Any:
    return wave.get("verdict", wave.get("state"))


def state_counts(rollout: Mapping[str, Any]) -> dict[str, int]:
    """Devices per state: counted from the rows, else the server's ``counts``."""
    rows = devices_of(rollout)
    if rows:
        return dict(Counter(scalar(r.get("state")) for r in rows))
    counts = rollout.get("counts")
    return dict(counts) if isinstance(counts, Mapping) else {}


def _key(value: Any) -> str:
    return scalar(value)


def wave_positions(rollout: Mapping[str, Any]) -> dict[str, int]:
    """A device row's ``wave`` (the server's wave index) → the 1-based number shown."""
    return {
        _key(wave.get("index", position - 1)): position
        for position, wave in enumerate(waves_of(rollout), start=1)
    }


def exit_status(rollout: Mapping[str, Any]) -> int | None:
    """``watch``'s exit status if the rollout is in a final state, else None."""
    return FINAL_EXIT.get(str(rollout.get("state")))


def _counts_text(counts: Mapping[str, int]) -> Text:
    text = Text()
    for i, (state, n) in enumerate(sorted(counts.items())):
        if i:
            text.append("  ")
        text.append(f"{n} ")
        text.append_text(styled(state))
    return text


def _device_order(row: Mapping[str, Any]) -> tuple[int, str]:
    state = scalar(row.get("state"))
    rank = 0 if state in FAILED_DEVICE_STATES else 1 if state in BUSY_DEVICE_STATES else 2
    return rank, device_id(row)


def rollout_view(rollout: Mapping[str, Any], *, max_devices: int | None = None) -> RenderableType:
    """The whole rollout. With ``max_devices``, failures and busy devices come first and the
    rest are summed up, so 1,000 devices fit a terminal."""
    header = Text()
    header.append(f"rollout {scalar(rollout.get('id'))}", style="bold")
    header.append(f"  model {scalar(rollout.get('model'))}  state ")
    header.append_text(styled(rollout.get("state")))
    if rollout.get("reason"):
        header.append(f"  ({scalar(rollout.get('reason'))})")
    parts: list[RenderableType] = [header, _counts_text(state_counts(rollout))]
    state = str(rollout.get("state"))
    if state in WAITING_FOR_OPERATOR:
        rollout_id = scalar(rollout.get("id"))
        parts.append(
            Text(
                f"waiting for the operator: edgelm fleet rollouts resume {rollout_id} "
                f"(or abort {rollout_id})",
                style="yellow",
            )
        )
    waves = Table("wave", "devices", "verdict", "reason", title="waves", title_justify="left")
    for position, wave in enumerate(waves_of(rollout), start=1):
        members = wave.get("devices")
        size = len(members) if isinstance(members, list) else wave.get("size")
        label = (
            f"{position} (canary)"
            if position == 1 and len(waves_of(rollout)) > 1
            else str(position)
        )
        waves.add_row(label, scalar(size), styled(verdict_of(wave)), scalar(wave.get("reason")))
    parts.append(waves)
    rows = sorted(devices_of(rollout), key=_device_order)
    shown = rows if max_devices is None else rows[:max_devices]
    positions = wave_positions(rollout)
    devices = Table("device", "wave", "state", "reason", title="devices", title_justify="left")
    for row in shown:
        reason = row.get("reason")
        devices.add_row(
            device_id(row),
            scalar(positions.get(_key(row.get("wave")), row.get("wave"))),
            styled(row.get("state")),
            Text(scalar(reason), style="red" if row.get("state") in FAILED_DEVICE_STATES else ""),
        )
    parts.append(devices)
    hidden = rows[len(shown) :]
    if hidden:
        more = Counter(scalar(r.get("state")) for r in hidden)
        line = Text(f"... and {len(hidden)} more: ")
        line.append_text(_counts_text(more))
        parts.append(line)
    return Group(*parts)


def changes(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[str]:
    """What changed from one snapshot of a rollout to the next, one line per change."""
    rollout_id = scalar(after.get("id"))
    if before is None:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(state_counts(after).items()))
        return [
            f"rollout {rollout_id} of {scalar(after.get('model'))}: {scalar(after.get('state'))}"
            f" ({counts or 'no devices'})"
        ]
    lines: list[str] = []
    old_waves = waves_of(before)
    for position, wave in enumerate(waves_of(after), start=1):
        old = verdict_of(old_waves[position - 1]) if position <= len(old_waves) else None
        new = verdict_of(wave)
        if new != old:
            reason = f": {wave['reason']}" if wave.get("reason") else ""
            lines.append(f"wave {position}: {scalar(old)} -> {scalar(new)}{reason}")
    old_states = {device_id(r): r.get("state") for r in devices_of(before)}
    for row in sorted(devices_of(after), key=device_id):
        old_state = old_states.get(device_id(row))
        if row.get("state") != old_state:
            reason = f": {row['reason']}" if row.get("reason") else ""
            lines.append(
                f"{device_id(row)}: {scalar(old_state)} -> {scalar(row.get('state'))}{reason}"
            )
    if before.get("state") != after.get("state"):
        reason = f": {after['reason']}" if after.get("reason") else ""
        lines.append(
            f"rollout {rollout_id}: {scalar(before.get('state'))} -> "
            f"{scalar(after.get('state'))}{reason}"
        )
    return lines
