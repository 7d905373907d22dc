"""``edgelm fleet keys publish`` keeps ``DIR/root.json`` at the root the control plane serves.

The fake control plane serves the fleet's real repository folder; the rotation is the real
``edgelm provision rotate-keys``; the publish is the real CLI, which verifies the served
metadata with python-tuf from ``DIR/root.json`` before it trusts any of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuf.api.metadata import Metadata, Root

from edgelm_protocol.root_director import director_keys_of
from edgelm_provisioning.fleet_dir import FleetDir
from tests.integration.provisioning.conftest import ok_json, run_fleet, run_provision
from tests.integration.provisioning.fake_control_plane import FakeControlPlane


def bundle_root(fleet_dir: FleetDir) -> Root:
    return Metadata[Root].from_file(str(fleet_dir.paths.root_json)).signed


class TestBundleRoot:
    def test_a_root_accepted_without_an_answer_reaches_dir_root_json_on_the_next_run(
        self, fleet_dir: FleetDir, control_plane: FakeControlPlane, tmp_path: Path
    ):
        """The control plane took root v2 (a director rotation) but the CLI never heard the
        answer: the next `keys publish` has nothing to send, yet writes the verified v2 to
        DIR/root.json, so a bundle made afterwards carries v2 and the new director key."""
        root = fleet_dir.paths.root
        rotated = ok_json(
            run_provision("rotate-keys", "--role", "director", "--fleet-dir", root, "--json")
        )
        assert rotated["root_version"] == 2
        signed_here = Metadata[Root].from_file(rotated["root_file"])
        control_plane.writer.accept_root(signed_here)  # accepted; the answer was lost
        assert bundle_root(fleet_dir).version == 1

        published = ok_json(run_fleet("keys", "publish", "--fleet-dir", root, "--json"))

        assert (published["published"], published["root_version"]) == ([], 2)
        assert bundle_root(fleet_dir) == signed_here.signed
        out = tmp_path / "kiosk-9.json"
        ok_json(run_provision("device", "kiosk-9", "--fleet-dir", root, "--class", "x86",
                              "--out", out, "--json"))  # fmt: skip
        issued = json.loads(out.read_bytes())
        assert issued["root"]["signed"]["version"] == 2
        new_keys = director_keys_of(signed_here.signed)
        assert new_keys is not None
        assert issued["director_keys"] == list(new_keys)
