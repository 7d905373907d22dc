"""``edgelm provision`` as an operator runs it: the real console entry point, in a subprocess.

These go through ``edgelm_cli``'s root command, so they also show that ``edgelm provision``
and ``edgelm fleet`` are wired to this package, with the exit statuses and JSON documented.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.agent_process import REPO


def edgelm(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
    return subprocess.run(
        [sys.executable, "-m", "edgelm_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=REPO,
    )


def ok_json(*args: str | Path) -> Any:
    result = edgelm(*args, "--json")
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return json.loads(result.stdout)


class TestProvisionThroughTheRootCommand:
    def test_fleet_init_then_a_device(self, tmp_path):
        """fleet-init then device, as JSON: the fleet's files, then a 0600 bundle."""
        fleet = tmp_path / "acme"
        made = ok_json("provision", "fleet-init", fleet, "--control-url", "http://cp.example:8480")
        assert made["fleet"] == "acme"
        assert made["repository_url"] == "http://cp.example:8480/repository"
        leaving = {f["path"] for f in made["files"] if f["destination"] != "stays"}
        assert "keys/root-0.pem" not in leaving
        assert "operator-token" not in leaving
        bundle = tmp_path / "k1.json"
        issued = ok_json(
            "provision", "device", "k1", "--fleet-dir", fleet, "--class", "x86",
            "--label", "site=lab", "--out", bundle,
        )  # fmt: skip
        assert issued["device"]["labels"] == {"site": "lab"}
        assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
        assert json.loads(bundle.read_text())["control_url"] == "http://cp.example:8480"

    def test_a_second_fleet_init_is_refused_with_status_1(self, tmp_path):
        """fleet-init over a fleet exits 1 with a diagnostic; its keys stay as they were."""
        fleet = tmp_path / "acme"
        ok_json("provision", "fleet-init", fleet)
        before = (fleet / "keys" / "root-0.pem").read_bytes()
        result = edgelm("provision", "fleet-init", fleet)
        assert result.returncode == 1
        assert "(fleet-exists)" in result.stderr
        assert (fleet / "keys" / "root-0.pem").read_bytes() == before

    def test_a_missing_required_option_is_status_2(self, tmp_path):
        """device without --out is a usage error: exit 2."""
        result = edgelm("provision", "device", "k1", "--fleet-dir", tmp_path)
        assert result.returncode == 2

    def test_token_create_prints_the_token_alone(self, tmp_path):
        """token create prints only the token on stdout; tokens.json gets its hash."""
        fleet = tmp_path / "acme"
        ok_json("provision", "fleet-init", fleet)
        result = edgelm("provision", "token", "create", "ci", "--fleet-dir", fleet)
        assert result.returncode == 0, result.stderr
        token = result.stdout.strip()
        assert len(token) == 43  # 32 bytes, URL-safe base64 without padding
        tokens = (fleet / "control" / "tokens.json").read_text()
        assert token not in tokens
        assert "ci" in tokens

    def test_fleet_help_is_reachable_from_the_root(self):
        """`edgelm fleet --help` lists the operator's command groups."""
        result = edgelm("fleet", "--help")
        assert result.returncode == 0, result.stderr
        for group in ("devices", "models", "rollouts", "jobs", "telemetry"):
            assert group in result.stdout
