"""The one translation of provisioning errors into the CLI's diagnostics, and which events
make a rollout watcher re-read."""

from __future__ import annotations

import json
from pathlib import Path

from edgelm_provisioning.errors import (
    ControlRequestFailed,
    ControlUnreachable,
    FleetDirError,
    InvalidValue,
    RepositoryRollback,
)
from edgelm_provisioning.operator_cli import diagnostic
from edgelm_provisioning.rollout_watch import concerns
from edgelm_provisioning.sse import ServerSentEvent


class TestDiagnostic:
    def test_a_server_refusal_keeps_its_code_and_says_where(self):
        """The server's code is the reference; the context names the call and the param."""
        error = ControlRequestFailed(
            url="http://cp/api/v1/rollouts",
            method="POST",
            status_code=422,
            code="unprocessable",
            message="the selector matches no device",
            param="selector",
        )
        shown = diagnostic(error, as_json=True).as_dict()["error"]
        assert shown == {
            "reference": "unprocessable",
            "message": "the selector matches no device",
            "context": "HTTP 422 from POST http://cp/api/v1/rollouts (about selector)",
            "hint": None,
        }

    def test_a_401_hints_at_tokens(self):
        """An authentication failure hints where tokens come from."""
        error = ControlRequestFailed(
            url="u", method="GET", status_code=401, code="unauthorized", message="no"
        )
        assert "EDGELM_CONTROL_TOKEN" in (diagnostic(error, as_json=False).hint or "")

    def test_our_errors_carry_their_context(self, tmp_path: Path):
        """Transport errors show the URL, fleet-dir errors the path, value errors the option."""
        assert diagnostic(ControlUnreachable("x", url="http://cp"), as_json=False).context == (
            "http://cp"
        )
        dir_error = FleetDirError("fleet-exists", tmp_path, "taken")
        assert diagnostic(dir_error, as_json=False).context == str(tmp_path)
        assert diagnostic(InvalidValue("label", "bad"), as_json=False).context == "in label"

    def test_a_rollback_says_nothing_was_signed(self):
        """An untrusted repository's hint tells the operator nothing was signed or uploaded."""
        shown = diagnostic(RepositoryRollback("older"), as_json=True)
        assert shown.reference == "repository-rollback"
        assert "nothing was signed" in (shown.hint or "")
        assert json.loads(json.dumps(shown.as_dict()))["error"]["message"] == "older"


class TestConcerns:
    def test_the_rollouts_own_events_concern_it(self):
        """A rollout event about this rollout concerns it; about another, it does not."""
        assert concerns(ServerSentEvent("rollout", '{"id": "ro-1"}'), "ro-1")
        assert not concerns(ServerSentEvent("rollout", '{"id": "ro-2"}'), "ro-1")

    def test_device_events_concern_it_unless_they_name_another_rollout(self):
        """A device event naming no rollout, or this one, may change it."""
        assert concerns(ServerSentEvent("device", '{"id": "k"}'), "ro-1")
        assert concerns(ServerSentEvent("device", '{"id": "k", "rollout": "ro-1"}'), "ro-1")
        assert not concerns(ServerSentEvent("device", '{"id": "k", "rollout": "ro-2"}'), "ro-1")

    def test_jobs_never_and_unreadable_events_always(self):
        """Job events never concern a rollout; an event whose data is not JSON might."""
        assert not concerns(ServerSentEvent("job", '{"id": "ro-1"}'), "ro-1")
        assert concerns(ServerSentEvent("rollout", "not json"), "ro-1")
