"""How a rollout is shown: the live view, the change lines of a piped watch, the exit status."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from edgelm_provisioning.rollout_view import changes, exit_status, rollout_view, state_counts


def rollout(state: str = "running", **devices: str) -> dict[str, Any]:
    return {
        "id": "ro-1",
        "model": "tiny@1.0",
        "state": state,
        "waves": [
            {"index": 0, "devices": ["a"], "verdict": "passed", "reason": None},
            {"index": 1, "devices": sorted(set(devices) - {"a"}), "verdict": "running"},
        ],
        "devices": [
            {"id": d, "wave": 0 if d == "a" else 1, "state": s, "reason": None}
            for d, s in sorted(devices.items())
        ],
    }


def render(renderable: Any) -> str:
    out = io.StringIO()
    Console(file=out, width=160, color_system=None).print(renderable)
    return out.getvalue()


class TestExitStatus:
    @pytest.mark.parametrize(
        ("state", "status"),
        [("completed", 0), ("failed", 3), ("aborted", 3), ("running", None), ("halted", None),
         ("paused", None)],
    )  # fmt: skip
    def test_final_states_map_to_exit_statuses(self, state, status):
        """completed exits 0, failed and aborted 3; other states are not final."""
        assert exit_status({"state": state}) == status


class TestChanges:
    def test_the_first_snapshot_is_one_summary_line(self):
        """The first line says the rollout, the model, the state and the device counts."""
        assert changes(None, rollout(a="succeeded", b="pending")) == [
            "rollout ro-1 of tiny@1.0: running (1 pending, 1 succeeded)"
        ]

    def test_each_change_is_one_line_with_its_reason(self):
        """Device, wave and rollout changes each give a line, reasons included."""
        before = rollout(a="succeeded", b="pending", c="pending")
        after = rollout("halted", a="succeeded", b="failed", c="pending")
        after["devices"][1]["reason"] = "health check: 0.4 tokens/s"
        after["waves"][1].update(verdict="failed", reason="failure_threshold: 1 of 2")
        assert changes(before, after) == [
            "wave 2: running -> failed: failure_threshold: 1 of 2",
            "b: pending -> failed: health check: 0.4 tokens/s",
            "rollout ro-1: running -> halted",
        ]

    def test_no_change_gives_no_line(self):
        """The same snapshot twice prints nothing."""
        snapshot = rollout(a="succeeded")
        assert changes(snapshot, snapshot) == []


class TestRolloutView:
    def test_failures_come_first_and_the_rest_is_summed_up(self):
        """With a row limit, failed devices are shown and the others counted by state."""
        devices = {f"d{i:02}": "succeeded" for i in range(20)} | {"d15": "failed", "a": "pending"}
        text = render(rollout_view(rollout(**devices), max_devices=3))
        cells = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
        assert [c for c in cells if c in devices] == ["d15", "a", "d00"]
        assert "... and 18 more: 18 succeeded" in text

    def test_devices_are_numbered_like_the_waves(self):
        """A device in the server's wave index 1 shows as wave 2, as the waves table counts."""
        text = render(rollout_view(rollout(a="succeeded", b="pending")))
        row = next(line for line in text.splitlines() if line.startswith("│ b "))
        assert [cell.strip() for cell in row.split("│")[1:3]] == ["b", "2"]

    def test_a_halted_rollout_says_how_to_go_on(self):
        """A rollout waiting for the operator shows the resume and abort commands."""
        text = render(rollout_view(rollout("halted", a="failed")))
        assert "edgelm fleet rollouts resume ro-1" in text

    def test_missing_fields_show_as_dashes(self):
        """A rollout without waves or devices (an older server) still renders."""
        text = render(rollout_view({"id": "ro-1", "state": "running"}))
        assert "rollout ro-1" in text
        assert "model -" in text

    def test_counts_fall_back_to_the_servers(self):
        """Without device rows, the counts are the server's summary."""
        assert state_counts({"counts": {"succeeded": 4}}) == {"succeeded": 4}
