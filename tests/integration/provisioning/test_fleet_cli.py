"""``edgelm fleet`` commands against the fake control plane: what they send, print and exit with.

These should move to the real control plane (``edgelm control run`` on the fleet's
control.toml) once it exists; the fake only stands in for its REST routes.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from edgelm_provisioning.fleet_dir import FleetDir
from tests.agent_process import TINY_GGUF
from tests.integration.provisioning.conftest import error_json, ok_json, run_fleet
from tests.integration.provisioning.fake_control_plane import FakeControlPlane


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


@pytest.fixture
def devices(control_plane: FakeControlPlane) -> FakeControlPlane:
    control_plane.add_device("kiosk-1", "pi5", site="berlin")
    control_plane.add_device("kiosk-2", "pi5", site="paris")
    control_plane.add_device("jet-1", "jetson", site="berlin")
    return control_plane


@pytest.fixture
def published(fleet_dir: FleetDir, devices: FakeControlPlane) -> FakeControlPlane:
    result = run_fleet(
        "models", "push", TINY_GGUF, "--name", "tiny", "--version", "1.0",
        "--fleet-dir", fleet_dir.paths.root, "--json",
    )  # fmt: skip
    ok_json(result)
    return devices


class TestConnectionSettings:
    def test_the_fleet_dir_gives_url_and_token(self, fleet_dir, devices):
        """With only --fleet-dir, the URL comes from fleet.toml and the token from its file."""
        page = ok_json(run_fleet("devices", "list", "--fleet-dir", fleet_dir.paths.root, "--json"))
        assert [d["id"] for d in page["data"]] == ["kiosk-1", "kiosk-2", "jet-1"]

    def test_the_environment_gives_url_and_token(self, fleet_dir, devices):
        """EDGELM_CONTROL_URL and EDGELM_CONTROL_TOKEN are enough, without any flag."""
        token = fleet_dir.paths.operator_token.read_text().strip()
        env = {"EDGELM_CONTROL_URL": devices.url, "EDGELM_CONTROL_TOKEN": token}
        page = ok_json(run_fleet("devices", "list", "--json", env=env))
        assert len(page["data"]) == 3

    def test_a_flag_wins_over_the_environment(self, fleet_dir, devices):
        """--control beats EDGELM_CONTROL_URL: a dead URL in the environment is not used."""
        env = {"EDGELM_CONTROL_URL": closed_port_url()}
        result = run_fleet(
            "devices", "list", "--control", devices.url,
            "--fleet-dir", fleet_dir.paths.root, "--json", env=env,
        )  # fmt: skip
        assert len(ok_json(result)["data"]) == 3

    def test_no_control_plane_anywhere_is_a_clear_error(self):
        """Without flag, variable or fleet dir, the error says where a URL can come from."""
        error = error_json(run_fleet("devices", "list", "--json"))
        assert error["reference"] == "no-control-url"
        assert "EDGELM_CONTROL_URL" in error["hint"]

    def test_an_unreachable_control_plane_is_a_clear_error(self):
        """A URL nobody answers on gives control-unreachable, exit 1, and where it tried."""
        url = closed_port_url()
        result = run_fleet("devices", "list", "--control", url, "--token", "t", "--json")
        error = error_json(result)
        assert error["reference"] == "control-unreachable"
        assert url in error["context"]

    def test_a_wrong_token_shows_the_servers_code(self, devices):
        """A 401 is shown with the server's error code as reference and a hint on tokens."""
        result = run_fleet("devices", "list", "--control", devices.url, "--token", "nope", "--json")
        error = error_json(result)
        assert error["reference"] == "unauthorized"
        assert "tokens.json" in error["hint"]

    def test_an_error_is_a_diagnostic_without_json(self, devices):
        """Without --json the error goes to stderr as a diagnostic and stdout stays empty."""
        result = run_fleet("devices", "list", "--control", devices.url, "--token", "nope")
        assert result.exit_code == 1
        assert result.stdout == ""
        assert "error: a valid bearer token is required" in result.stderr
        assert "(unauthorized)" in result.stderr


class TestDevices:
    def test_list_filters_by_label_and_class(self, fleet_dir, devices):
        """--label and --class go to the server as query parameters and select devices."""
        page = ok_json(
            run_fleet(
                "devices",
                "list",
                "--label",
                "site=berlin",
                "--class",
                "pi5",
                "--fleet-dir",
                fleet_dir.paths.root,
                "--json",
            )
        )
        assert [d["id"] for d in page["data"]] == ["kiosk-1"]

    def test_list_prints_a_table(self, fleet_dir, devices):
        """Without --json, list prints one row per device with its class and labels."""
        result = run_fleet("devices", "list", "--fleet-dir", fleet_dir.paths.root)
        assert result.exit_code == 0, result.stderr
        assert "kiosk-1" in result.stdout
        assert "site=berlin" in result.stdout

    def test_show_gives_the_device_and_its_events(self, fleet_dir, devices):
        """show prints the device with the lists it carries (its recent events)."""
        result = run_fleet("devices", "show", "kiosk-1", "--fleet-dir", fleet_dir.paths.root)
        assert result.exit_code == 0, result.stderr
        assert "activated" in result.stdout

    def test_show_of_an_unknown_device_is_not_found(self, fleet_dir, devices):
        """An unknown id gives the server's not_found code as reference."""
        result = run_fleet(
            "devices", "show", "nobody", "--fleet-dir", fleet_dir.paths.root, "--json"
        )
        assert error_json(result)["reference"] == "not_found"

    def test_show_refuses_a_wildcard_id_before_calling(self, fleet_dir, devices):
        """An id of the MQTT-wildcard class is refused locally; the server is never asked."""
        result = run_fleet("devices", "show", "+", "--fleet-dir", fleet_dir.paths.root, "--json")
        assert error_json(result)["reference"] == "invalid-device-id"
        assert devices.count("GET", "/api/v1/devices/+") == 0


class TestModelsList:
    def test_list_shows_the_pushed_model(self, fleet_dir, published):
        """models list gives the targets the control plane serves."""
        page = ok_json(run_fleet("models", "list", "--fleet-dir", fleet_dir.paths.root, "--json"))
        assert [(m["name"], m["version"]) for m in page["data"]] == [("tiny", "1.0")]


class TestRollouts:
    def create(self, fleet_dir: FleetDir, *args: str) -> dict[str, Any]:
        result = run_fleet(
            "rollouts", "create", "--model", "tiny@1.0", *args,
            "--fleet-dir", str(fleet_dir.paths.root), "--json",
        )  # fmt: skip
        return ok_json(result)  # type: ignore[no-any-return]

    def test_create_sends_the_selector_and_settings(self, fleet_dir, published):
        """create posts the selector, the wave plan and the settings, durations in seconds."""
        rollout = self.create(
            fleet_dir, "--label", "site=berlin", "--canary", "1", "--failure-threshold", "10%",
            "--on-failure", "abort", "--device-timeout", "30m", "--pending-expiry", "2d",
            "--health-margin", "0.2",
        )  # fmt: skip
        assert rollout["selector"] == {"labels": {"site": "berlin"}}
        assert rollout["settings"] == {
            "canary": "1",
            "failure_threshold": 0.1,
            "on_failure": "abort",
            "device_timeout_s": 1800,
            "pending_expiry_s": 172800,
            "health_margin": 0.2,
        }
        assert [d["id"] for d in rollout["devices"]] == ["jet-1", "kiosk-1"]

    def test_create_prints_the_id_alone_on_stdout(self, fleet_dir, published):
        """Without --json, stdout holds only the rollout id, for RO=$(...)."""
        result = run_fleet(
            "rollouts", "create", "--model", "tiny@1.0", "--all",
            "--fleet-dir", fleet_dir.paths.root,
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert result.stdout == "ro-1\n"

    def test_two_selectors_are_a_usage_error(self, fleet_dir, published):
        """--all with --class is a malformed command line: exit 2, nothing sent."""
        result = run_fleet(
            "rollouts", "create", "--model", "tiny@1.0", "--all", "--class", "pi5",
            "--fleet-dir", fleet_dir.paths.root,
        )  # fmt: skip
        assert result.exit_code == 2
        assert published.count("POST", "/api/v1/rollouts") == 0

    def test_a_bad_duration_is_a_usage_error(self, fleet_dir, published):
        """--device-timeout 5 weeks is not a duration: exit 2."""
        result = run_fleet(
            "rollouts", "create", "--model", "tiny@1.0", "--all", "--device-timeout", "5w",
            "--fleet-dir", fleet_dir.paths.root,
        )  # fmt: skip
        assert result.exit_code == 2

    def test_an_unknown_model_shows_the_servers_refusal(self, fleet_dir, published):
        """A model the repository lacks is refused by the server; its code is the reference."""
        result = run_fleet(
            "rollouts", "create", "--model", "ghost@9", "--all",
            "--fleet-dir", fleet_dir.paths.root, "--json",
        )  # fmt: skip
        error = error_json(result)
        assert error["reference"] == "not_found"
        assert "about model" in error["context"]

    def test_show_json_gives_the_state_and_every_devices_state(self, fleet_dir, published):
        """rollouts show --json has the rollout's state and each device's state."""
        self.create(fleet_dir, "--all", "--canary", "1")
        published.set_device_state("ro-1", "jet-1", "failed", "health check: 0.5 tokens/s")
        shown = ok_json(
            run_fleet("rollouts", "show", "ro-1", "--fleet-dir", fleet_dir.paths.root, "--json")
        )
        assert shown["state"] == "running"
        assert {d["id"]: d["state"] for d in shown["devices"]} == {
            "jet-1": "failed",
            "kiosk-1": "waiting",
            "kiosk-2": "waiting",
        }

    def test_show_prints_waves_devices_and_reasons(self, fleet_dir, published):
        """rollouts show draws each wave and each device, with the reason of a failure."""
        self.create(fleet_dir, "--all", "--canary", "1")
        published.set_device_state("ro-1", "jet-1", "failed", "health check too slow")
        result = run_fleet("rollouts", "show", "ro-1", "--fleet-dir", fleet_dir.paths.root)
        assert result.exit_code == 0, result.stderr
        assert "1 (canary)" in result.stdout
        assert "health check too slow" in result.stdout

    def test_pause_resume_abort(self, fleet_dir, published):
        """pause, resume and abort post to the rollout and print its new state."""
        self.create(fleet_dir, "--all")
        root = fleet_dir.paths.root
        states = [
            ok_json(run_fleet("rollouts", action, "ro-1", "--fleet-dir", root, "--json"))["state"]
            for action in ("pause", "resume", "abort")
        ]
        assert states == ["paused", "running", "aborted"]

    def test_an_illegal_action_is_a_conflict(self, fleet_dir, published):
        """Resuming a running rollout is refused with the server's conflict code."""
        self.create(fleet_dir, "--all")
        result = run_fleet(
            "rollouts", "resume", "ro-1", "--fleet-dir", fleet_dir.paths.root, "--json"
        )
        assert error_json(result)["reference"] == "conflict"

    def test_list_filters_by_state(self, fleet_dir, published):
        """rollouts list --state passes the filter and returns the summaries."""
        self.create(fleet_dir, "--all")
        self.create(fleet_dir, "--class", "jetson")
        run_fleet("rollouts", "abort", "ro-1", "--fleet-dir", fleet_dir.paths.root)
        page = ok_json(
            run_fleet(
                "rollouts",
                "list",
                "--state",
                "running",
                "--fleet-dir",
                fleet_dir.paths.root,
                "--json",
            )
        )
        assert [r["id"] for r in page["data"]] == ["ro-2"]


class TestJobs:
    def test_submit_sends_an_openai_request_to_the_selection(self, fleet_dir, devices):
        """jobs submit posts a chat request and the selector; show lists each device."""
        job = ok_json(
            run_fleet(
                "jobs",
                "submit",
                "Hello there",
                "--model",
                "tiny",
                "--devices",
                "kiosk-2,kiosk-1",
                "--max-tokens",
                "8",
                "--fleet-dir",
                fleet_dir.paths.root,
                "--json",
            )
        )
        assert devices.jobs[job["id"]]["request"] == {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello there"}],
            "max_tokens": 8,
        }
        shown = ok_json(
            run_fleet("jobs", "show", job["id"], "--fleet-dir", fleet_dir.paths.root, "--json")
        )
        assert [d["device"] for d in shown["devices"]] == ["kiosk-1", "kiosk-2"]

    def test_show_prints_each_devices_answer_or_error(self, fleet_dir, devices):
        """jobs show prints a device's answer text and another's error."""
        job_id = run_fleet(
            "jobs", "submit", "Hi", "--model", "tiny", "--all", "--fleet-dir", fleet_dir.paths.root
        ).stdout.strip()
        entries = devices.jobs[job_id]["devices"]
        entries[0].update(state="succeeded", result={"choices": [{"message": {"content": "Hey!"}}]})
        entries[1].update(state="failed", error={"code": "model_not_found", "message": "no model"})
        result = run_fleet("jobs", "show", job_id, "--fleet-dir", fleet_dir.paths.root)
        assert result.exit_code == 0, result.stderr
        assert "Hey!" in result.stdout
        assert "model_not_found" in result.stdout


class TestTelemetry:
    def test_group_by_is_passed_and_shown(self, fleet_dir, devices):
        """--group-by asks the server for aggregates and prints them as a table."""
        devices.telemetry = [
            {"device": "kiosk-1", "model": "tiny@1.0", "hardware_class": "pi5"},
            {"device": "kiosk-2", "model": "tiny@1.0", "hardware_class": "pi5"},
        ]
        answer = ok_json(
            run_fleet(
                "telemetry",
                "--group-by",
                "model,hardware_class",
                "--fleet-dir",
                fleet_dir.paths.root,
                "--json",
            )
        )
        assert answer["data"] == [{"model": "tiny@1.0", "hardware_class": "pi5", "count": 2}]

    def test_an_unknown_group_is_refused_locally(self, fleet_dir, devices):
        """--group-by takes model and hardware_class only; others never reach the server."""
        result = run_fleet(
            "telemetry", "--group-by", "site", "--fleet-dir", fleet_dir.paths.root, "--json"
        )
        assert error_json(result)["reference"] == "invalid-group-by"
        assert devices.count("GET", "/api/v1/telemetry") == 0

    def test_a_device_filter_is_passed(self, fleet_dir, devices):
        """--device asks for one device's rows."""
        devices.telemetry = [{"device": "kiosk-1", "tokens_per_s": 9.5}, {"device": "kiosk-2"}]
        result = run_fleet("telemetry", "--device", "kiosk-1", "--fleet-dir", fleet_dir.paths.root)
        assert result.exit_code == 0, result.stderr
        assert "9.5" in result.stdout
        assert "kiosk-2" not in result.stdout


class TestHelp:
    def test_exit_statuses_are_documented(self):
        """edgelm fleet --help states the exit statuses, watch's 3 included."""
        result = run_fleet("--help")
        assert "Exit statuses: 0 done, 1 error, 2 malformed command line" in result.stdout
        assert "exits 3" in result.stdout
