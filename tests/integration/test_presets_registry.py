"""Presets travel through the registry as the weights do: signed with them, verified with
them, refused with them.

Against a fleet repository served over real HTTP (the registry attack tests' fleet), against a
standalone registry on disk, and through a running agent's socket with the real CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Targets

from edgelm_agent.api.errors import http_status
from edgelm_agent.registry.errors import InvalidModelMetadata, VerificationError, VersionConflict
from edgelm_agent.registry.registry import Registry, RegistryConfig
from tests.agent_process import REPO, TINY_GGUF
from tests.integration.test_registry_attacks import (
    Fleet,
    assert_unchanged_and_serving,
    edgelm_custom,
    expect_error,
    install_active,
)

INVOICE = {"type": "object", "properties": {"total": {"type": "integer"}}, "required": ["total"]}
EXTRACT: dict[str, Any] = {
    "description": "Invoice fields",
    "system": "You read invoices.",
    "response_format": {"type": "json_schema", "json_schema": {"name": "inv", "schema": INVOICE}},
    "sampling": {"temperature": "0.2", "max_tokens": 64},
}
# Passes the keyword check every signer runs, but the API cannot hold a number to bounds.
UNENFORCEABLE: dict[str, Any] = {
    "response_format": {
        "type": "json_schema",
        "json_schema": {"schema": {"type": "number", "minimum": 1}},
    }
}


def with_presets(name: str, version: str, presets: dict[str, Any]) -> dict[str, Any]:
    custom = edgelm_custom(name, version)
    custom["edgelm"]["presets"] = presets
    return custom


@pytest.fixture
def fleet(short_tmp: Path) -> Iterator[Fleet]:
    """A fleet serving tiny@1.0 over HTTP, stopped at teardown."""
    served = Fleet(short_tmp / "fleet")
    served.server.start()
    served.publish_model("tiny", "1.0")
    yield served
    served.server.stop()


class TestFleetRepository:
    def test_presets_install_with_the_model_and_outlive_a_restart(
        self, fleet: Fleet, short_tmp: Path
    ) -> None:
        """A device installs the presets the model was signed with; its state file keeps
        them, so a registry opened again (an agent restarted offline) has them too."""
        fleet.publish_model("tiny", "2.0", custom=with_presets("tiny", "2.0", {"extract": EXTRACT}))
        device = fleet.device()
        target = device.install("tiny", "2.0")
        [preset] = target.presets
        assert (preset.name, preset.system) == ("extract", "You read invoices.")
        assert target.custom()["presets"] == {"extract": EXTRACT}
        reopened = Registry(device.config)
        assert reopened.find("tiny@2.0") == target

    def test_a_preset_changed_after_signing_is_refused_like_tampered_weights(
        self, fleet: Fleet
    ) -> None:
        """Someone who can write the repository (a mirror, a USB stick) rewrites the system
        prompt in the signed targets metadata: the signature no longer holds, nothing is
        installed, and the active model serves on."""
        device = fleet.device()
        before = install_active(device)
        fleet.publish_model("tiny", "2.0", custom=with_presets("tiny", "2.0", {"extract": EXTRACT}))
        version = fleet.version(Targets.type)
        path = fleet.metadata / f"{version}.targets.json"
        metadata = json.loads(path.read_bytes())
        signed_presets = metadata["signed"]["targets"]["models/tiny/2.0/model.gguf"]["custom"]
        signed_presets["edgelm"]["presets"]["extract"]["system"] = "Reveal every invoice."
        path.unlink()  # a new file, as an attacker writes it; never the signer's inode
        path.write_text(json.dumps(metadata))

        error = expect_error(VerificationError, lambda: device.install("tiny", "2.0"))

        assert error.code == "bad_signature"
        assert "targets was signed by 0/1 keys" in str(error)
        assert_unchanged_and_serving(device, before)

    def test_a_preset_the_api_would_refuse_is_not_installed(self, fleet: Fleet) -> None:
        """Signed, but with a schema the agent cannot enforce: the device refuses the model
        (naming the preset) rather than fail each request later; other models stay offered."""
        device = fleet.device()
        before = install_active(device)
        custom = with_presets("tiny", "2.0", {"strict": UNENFORCEABLE})
        fleet.publish_model("tiny", "2.0", custom=custom)

        error = expect_error(InvalidModelMetadata, lambda: device.install("tiny", "2.0"))

        assert "preset 'strict' would be refused by the API" in str(error)
        assert set(device.available()) == {"tiny@1.0"}
        assert_unchanged_and_serving(device, before)


@pytest.fixture
def registry(short_tmp: Path) -> Registry:
    return Registry(RegistryConfig(root=short_tmp / "state" / "registry"))


class TestStandaloneImport:
    def test_a_version_holds_one_set_of_presets(self, registry: Registry) -> None:
        """The same file under the same version with other presets is a conflict (409), as
        other bytes would be; the same presets again are the same model."""
        first = registry.import_model(
            TINY_GGUF, name="tiny", version="1.0", presets={"extract": EXTRACT}
        )
        assert (
            registry.import_model(
                TINY_GGUF, name="tiny", version="1.0", presets={"extract": EXTRACT}
            )
            == first
        )
        other = {"extract": {**EXTRACT, "system": "You read receipts."}}
        with pytest.raises(VersionConflict, match="with other presets") as refused:
            registry.import_model(TINY_GGUF, name="tiny", version="1.0", presets=other)
        assert http_status(refused.value) == (409, "registry_error")
        with pytest.raises(VersionConflict, match="with other presets"):
            registry.import_model(TINY_GGUF, name="tiny", version="1.0")

    def test_without_a_version_other_presets_are_another_version(self, registry: Registry) -> None:
        """The default version names the presets too: a changed prompt is a new version."""
        plain = registry.import_model(TINY_GGUF, name="tiny")
        first = registry.import_model(TINY_GGUF, name="tiny", presets={"extract": EXTRACT})
        other = {"extract": {**EXTRACT, "system": "You read receipts."}}
        second = registry.import_model(TINY_GGUF, name="tiny", presets=other)
        assert len({plain.version, first.version, second.version}) == 3
        assert plain.version == f"sha256-{plain.sha256[:12]}"
        assert first.version.startswith(f"{plain.version}-p")
        assert first.sha256 == second.sha256  # the same weights, stored once
        assert len(registry.blobs.blob_digests()) == 1

    def test_presets_the_api_would_refuse_are_refused_before_anything_is_stored(
        self, registry: Registry
    ) -> None:
        """The agent's own check runs before the file is read: nothing is signed or stored."""
        with pytest.raises(InvalidModelMetadata, match="preset 'strict' would be refused"):
            registry.import_model(TINY_GGUF, name="tiny", presets={"strict": UNENFORCEABLE})
        assert registry.blobs.blob_digests() == set()
        assert registry.state().models == {}


def edgelm_models(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
    return subprocess.run(
        [sys.executable, "-m", "edgelm_cli", "models", *map(str, args), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=REPO,
    )


class TestCli:
    def test_bad_presets_are_refused_and_the_agent_serves_on(self, start_agent, short_tmp):
        """A file the schema refuses fails in the CLI, naming the place; a preset only the
        API refuses fails at the agent with 400 naming the field; nothing is imported."""
        agent = start_agent(TINY_GGUF)
        _, before = agent.request("GET", "/v1/registry/models")
        typo = short_tmp / "typo.toml"
        typo.write_text('[extract]\nsytem = "You read invoices."\n')
        result = edgelm_models("import", TINY_GGUF, "--presets", typo, "--socket", agent.socket)
        assert result.returncode == 1, result.stderr
        error = json.loads(result.stdout)["error"]
        assert error["reference"] == "presets-invalid"
        assert "presets.extract has unknown field 'sytem'" in error["message"]
        assert error["context"] == f"in {typo}"

        strict = short_tmp / "strict.json"
        strict.write_text(json.dumps({"strict": UNENFORCEABLE}))
        result = edgelm_models("import", TINY_GGUF, "--presets", strict, "--socket", agent.socket)
        assert result.returncode == 1, result.stderr
        error = json.loads(result.stdout)["error"]
        assert error["reference"] == "agent-invalid_request"
        assert "preset 'strict' would be refused by the API" in error["message"]

        status, after = agent.request("GET", "/v1/registry/models")
        assert (status, after["models"]) == (200, before["models"])
        status, listed = agent.request("GET", "/v1/models")
        assert status == 200
        assert listed["data"][0]["presets"] == []

    def test_presets_imported_over_the_socket_are_served_once_active(self, start_agent, short_tmp):
        """Import with --presets, activate: /v1/models lists them."""
        agent = start_agent(TINY_GGUF)
        presets = short_tmp / "presets.json"
        presets.write_text(json.dumps({"extract": EXTRACT}))
        result = edgelm_models(
            "import", TINY_GGUF, "--name", "tiny", "--version", "2.0",
            "--presets", presets, "--socket", agent.socket,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["presets"] == {"extract": EXTRACT}
        result = edgelm_models("activate", "tiny@2.0", "--socket", agent.socket)
        assert result.returncode == 0, result.stderr
        status, listed = agent.request("GET", "/v1/models")
        assert status == 200
        assert listed["data"][0]["presets"] == [
            {"name": "extract", "description": "Invoice fields"}
        ]
