"""``edgelm models`` as an operator runs it: the real CLI against real agents and state dirs.

Every command runs as a subprocess, through a running agent's socket or, with ``--state-dir``,
on a stopped agent's files; what the agent then serves is checked over its socket. The extra
GGUF models that are only stored, never loaded, are the tiny model with bytes appended, so
their blobs differ from the served model's and garbage collection has something to free.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import REPO, TINY_GGUF, TINY_ONNX, AgentProcess

VIEW_FLAGS = ("ref", "active", "previous", "pinned")  # what `list` adds to a target


def edgelm_models(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
    return subprocess.run(
        [sys.executable, "-m", "edgelm_cli", "models", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=REPO,
    )


def ok_json(*args: str | Path) -> Any:
    """Run a command with --json; it must succeed and print exactly one JSON document."""
    result = edgelm_models(*args, "--json")
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return json.loads(result.stdout)


def error_json(*args: str | Path) -> dict[str, Any]:
    """Run a command with --json that must fail; return its error object."""
    result = edgelm_models(*args, "--json")
    assert result.returncode == 1, (args, result.stdout, result.stderr)
    error: dict[str, Any] = json.loads(result.stdout)["error"]
    return error


def target_of(view: dict[str, Any], ref: str) -> dict[str, Any]:
    """The signed target of one model in a `list` view, without the flags `list` adds."""
    [model] = [m for m in view["models"] if m["ref"] == ref]
    return {k: v for k, v in model.items() if k not in VIEW_FLAGS}


def refs(view: dict[str, Any]) -> list[str]:
    return [m["ref"] for m in view["models"]]


def serving(agent: AgentProcess) -> str:
    """The one model id the agent lists in /v1/models, after proving it answers a completion."""
    status, listed = agent.request("GET", "/v1/models")
    assert status == 200, listed
    [model] = listed["data"]
    status, completion = agent.request(
        "POST",
        "/v1/completions",
        {"model": model["id"], "prompt": "hello", "max_tokens": 3, "temperature": 0},
    )
    assert status == 200, completion
    assert completion["model"] == model["id"]
    assert completion["usage"]["completion_tokens"] == 3  # greedy: neither model stops early
    return str(model["id"])


def variant_gguf(directory: Path, name: str, tag: int) -> Path:
    """The tiny GGUF with bytes appended: a valid import with a blob of its own."""
    path = directory / f"{name}.gguf"
    path.write_bytes(TINY_GGUF.read_bytes() + bytes([tag]) * 16)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blob_dir(workdir: Path) -> Path:
    return workdir / "state" / "registry" / "blobs" / "sha256"


def blobs(workdir: Path) -> set[str]:
    return {p.name for p in blob_dir(workdir).iterdir()}


def corrupt(blob: Path) -> None:
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


@pytest.fixture
def restart_agent() -> Iterator[Callable[[AgentProcess], AgentProcess]]:
    """Start an agent again on a stopped agent's workdir, with no --model; stopped at teardown."""
    started: list[AgentProcess] = []

    def restart(previous: AgentProcess) -> AgentProcess:
        agent = AgentProcess(previous.workdir, model=None)
        started.append(agent)
        return agent.wait_ready()

    yield restart
    for agent in started:
        agent.stop()


class TestActivateAndRollback:
    def test_import_activate_rollback_over_the_socket(self, start_agent):
        """An imported model is installed but not served; activating it switches the agent to
        it; rollback switches back to the one before, and again to the other."""
        agent = start_agent(TINY_GGUF)
        sock = agent.socket
        before = ok_json("list", "--socket", sock)
        first = before["active"]
        assert first.startswith("tiny-llama@sha256-")
        assert before["previous"] is None
        assert refs(before) == [first]

        imported = ok_json("import", TINY_ONNX, "--version", "1.0", "--socket", sock)
        assert imported["name"] == "tiny-onnx"
        assert imported["version"] == "1.0"
        assert imported["format"] == "onnx"
        assert imported["backend"] == "onnxruntime-genai"
        assert imported["path"] == "models/tiny-onnx/1.0/bundle.json"
        assert imported["context_length"] == 4096
        after_import = ok_json("list", "--socket", sock)
        assert refs(after_import) == [first, "tiny-onnx@1.0"]
        assert after_import["active"] == first
        assert target_of(after_import, "tiny-onnx@1.0") == imported
        assert serving(agent) == "tiny-llama"  # importing does not switch

        assert ok_json("activate", "tiny-onnx@1.0", "--socket", sock) == imported
        assert serving(agent) == "tiny-onnx"
        view = ok_json("list", "--socket", sock)
        assert (view["active"], view["previous"]) == ("tiny-onnx@1.0", first)
        assert view["history"][-1]["event"] == "activated"
        assert view["history"][-1]["model"] == "tiny-onnx@1.0"
        flags = {m["ref"]: (m["active"], m["previous"]) for m in view["models"]}
        assert flags == {first: (False, True), "tiny-onnx@1.0": (True, False)}

        rolled = ok_json("rollback", "--socket", sock)
        assert rolled == target_of(before, first)
        assert serving(agent) == "tiny-llama"
        view = ok_json("list", "--socket", sock)
        assert (view["active"], view["previous"]) == (first, "tiny-onnx@1.0")
        last = view["history"][-1]
        assert (last["event"], last["model"], last["reason"]) == ("rolled_back", first, "requested")

        assert ok_json("rollback", "--socket", sock) == imported  # back again to the other
        assert serving(agent) == "tiny-onnx"

    def test_activate_by_name_takes_the_newest_version(self, start_agent):
        """NAME without @VERSION means its newest installed version, 1.10 after 1.9; the
        human output names what became active."""
        agent = start_agent(TINY_GGUF)
        for version in ("1.10", "1.9"):
            ok_json("import", TINY_ONNX, "--version", version, "--socket", agent.socket)
        result = edgelm_models("activate", "tiny-onnx", "--socket", agent.socket)
        assert result.returncode == 0, result.stderr
        assert "active: tiny-onnx@1.10" in result.stderr
        assert result.stdout == ""
        assert ok_json("list", "--socket", agent.socket)["active"] == "tiny-onnx@1.10"
        assert serving(agent) == "tiny-onnx"

    def test_rollback_without_a_previous_model(self, start_agent):
        """With nothing to go back to, rollback fails with exit 1 through the socket and on
        disk, and changes nothing."""
        agent = start_agent(TINY_GGUF)
        error = error_json("rollback", "--socket", agent.socket)
        assert error["reference"] == "agent-model_not_installed"
        assert error["message"] == "there is no previous model to roll back to"
        assert serving(agent) == "tiny-llama"
        assert agent.stop() == 0

        state_dir = agent.workdir / "state"
        error = error_json("rollback", "--state-dir", state_dir)
        assert error["reference"] == "no-previous"
        assert error["message"] == "there is no previous model"
        view = ok_json("list", "--state-dir", state_dir)
        assert view["active"].startswith("tiny-llama@")
        assert view["previous"] is None


class TestBadRequests:
    def test_bad_imports_and_refs_fail_with_exit_1_and_the_agent_serves_on(
        self, start_agent, short_tmp
    ):
        """Unknown refs, files that are not models and a changed version are refused with a
        message naming the problem; the registry and the served model stay as they were."""
        agent = start_agent(TINY_GGUF)
        sock = agent.socket
        before = ok_json("list", "--socket", sock)
        first = before["active"]

        error = error_json("activate", "nope@1.0", "--socket", sock)
        assert error["reference"] == "agent-model_not_installed"
        assert error["message"] == f"model nope@1.0 is not installed; installed: {first}"
        human = edgelm_models("activate", "nope@1.0", "--socket", sock)
        assert human.returncode == 1
        assert "error: model nope@1.0 is not installed" in human.stderr
        assert "(agent-model_not_installed)" in human.stderr

        error = error_json("pin", "nope@1.0", "--socket", sock)
        assert error["reference"] == "agent-model_not_installed"

        text = short_tmp / "notes.txt"
        text.write_text("not a model\n")
        error = error_json("import", text, "--socket", sock)
        assert error["reference"] == "agent-invalid_model_metadata"
        assert error["message"] == f"{text} is not a GGUF file"

        folder = short_tmp / "empty-model"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"\0" * 64)
        error = error_json("import", folder, "--socket", sock)
        assert error["reference"] == "agent-invalid_model_metadata"
        assert error["message"] == f"{folder} is a folder without genai_config.json"

        name, version = first.split("@")
        changed = variant_gguf(short_tmp, "changed", 1)
        error = error_json(
            "import", changed, "--name", name, "--version", version, "--socket", sock
        )
        assert error["message"] == (
            f"{first} already exists with other content; "
            "versions never change, so import under a new version"
        )

        missing = edgelm_models("import", short_tmp / "missing.gguf", "--socket", sock)
        assert missing.returncode == 2  # click's usage error: the path is checked before sending
        assert "does not exist" in missing.stderr

        after = ok_json("list", "--socket", sock)
        assert (after["active"], after["models"]) == (first, before["models"])
        assert serving(agent) == "tiny-llama"
        assert ok_json("verify", "--socket", sock)["ok"] is True

    def test_install_on_a_standalone_state_dir_says_there_is_no_repository(self, start_agent):
        """install on a stopped standalone agent's files is refused: there is no fleet
        repository to install from, and the hint says what to do instead."""
        agent = start_agent(TINY_GGUF)
        assert agent.stop() == 0
        error = error_json("install", "tiny-llama", "--state-dir", agent.workdir / "state")
        assert error["reference"] == "direct-install"
        assert "edgelm models import" in error["hint"]


class TestGcAndPin:
    def test_gc_keeps_active_previous_and_pinned_over_the_socket(self, start_agent, short_tmp):
        """gc removes exactly the models that are neither active, previous nor pinned, and
        their blobs; a pin keeps a model until it is unpinned."""
        agent = start_agent(TINY_GGUF)
        sock = agent.socket
        first = ok_json("list", "--socket", sock)["active"]
        ok_json("import", TINY_ONNX, "--version", "1.0", "--socket", sock)
        ok_json("activate", "tiny-onnx@1.0", "--socket", sock)  # first becomes previous
        kept_file = variant_gguf(short_tmp, "kept", 1)
        loose_file = variant_gguf(short_tmp, "loose", 2)
        kept = ok_json("import", kept_file, "--version", "1.0", "--socket", sock)
        loose = ok_json("import", loose_file, "--version", "1.0", "--socket", sock)
        assert (kept["sha256"], loose["sha256"]) == (sha256_of(kept_file), sha256_of(loose_file))
        stored = blobs(agent.workdir)
        assert {kept["sha256"], loose["sha256"]} <= stored

        pinned = ok_json("pin", "kept@1.0", "--socket", sock)
        assert pinned == {**kept, "pinned": True}
        view = ok_json("list", "--socket", sock)
        assert view["pinned"] == ["kept@1.0"]
        assert [m["ref"] for m in view["models"] if m["pinned"]] == ["kept@1.0"]

        assert ok_json("gc", "--socket", sock) == {
            "removed": ["loose@1.0"],
            "freed_bytes": loose["length"],
        }
        assert blobs(agent.workdir) == stored - {loose["sha256"]}
        view = ok_json("list", "--socket", sock)
        assert refs(view) == ["kept@1.0", first, "tiny-onnx@1.0"]
        assert (view["active"], view["previous"]) == ("tiny-onnx@1.0", first)
        assert ok_json("gc", "--socket", sock) == {"removed": [], "freed_bytes": 0}

        assert ok_json("pin", "kept@1.0", "--unpin", "--socket", sock) == {
            **kept,
            "pinned": False,
        }
        assert ok_json("list", "--socket", sock)["pinned"] == []
        assert ok_json("gc", "--socket", sock) == {
            "removed": ["kept@1.0"],
            "freed_bytes": kept["length"],
        }
        assert blobs(agent.workdir) == stored - {loose["sha256"], kept["sha256"]}
        view = ok_json("list", "--socket", sock)
        assert refs(view) == [first, "tiny-onnx@1.0"]
        assert (view["active"], view["previous"]) == ("tiny-onnx@1.0", first)
        assert [h["model"] for h in view["history"] if h["event"] == "removed"] == [
            "loose@1.0",
            "kept@1.0",
        ]

        # The removed models are gone for good: not installed, not offered, but importable again.
        error = error_json("activate", "loose@1.0", "--socket", sock)
        assert error["reference"] == "agent-model_not_installed"
        error = error_json("install", "loose@1.0", "--socket", sock)
        assert error["message"] == "the repository has no model loose@1.0"
        assert ok_json("import", loose_file, "--version", "1.0", "--socket", sock) == loose

        verified = ok_json("verify", "--socket", sock)
        assert verified == {
            "ok": True,
            "results": [
                {"ref": "loose@1.0", "ok": True, "error": None},
                {"ref": first, "ok": True, "error": None},
                {"ref": "tiny-onnx@1.0", "ok": True, "error": None},
            ],
        }
        assert serving(agent) == "tiny-onnx"
        assert ok_json("rollback", "--socket", sock)["name"] == "tiny-llama"  # previous intact
        assert serving(agent) == "tiny-llama"

    def test_gc_and_pin_on_a_stopped_agent(self, start_agent, restart_agent, short_tmp):
        """pin and gc with --state-dir do the same on disk; the agent then starts on its model."""
        agent = start_agent(TINY_GGUF)
        first = ok_json("list", "--socket", agent.socket)["active"]
        one = ok_json("import", variant_gguf(short_tmp, "one", 1), "--socket", agent.socket)
        two = ok_json("import", variant_gguf(short_tmp, "two", 2), "--socket", agent.socket)
        assert agent.stop() == 0
        state_dir = agent.workdir / "state"
        stored = blobs(agent.workdir)

        assert ok_json("pin", two["name"], "--state-dir", state_dir) == {**two, "pinned": True}
        assert ok_json("gc", "--state-dir", state_dir) == {
            "removed": [f"one@{one['version']}"],
            "freed_bytes": one["length"],
        }
        assert blobs(agent.workdir) == stored - {one["sha256"]}
        unpinned = ok_json("pin", f"two@{two['version']}", "--unpin", "--state-dir", state_dir)
        assert unpinned["pinned"] is False
        assert ok_json("gc", "--state-dir", state_dir)["removed"] == [f"two@{two['version']}"]
        assert blobs(agent.workdir) == stored - {one["sha256"], two["sha256"]}
        view = ok_json("list", "--state-dir", state_dir)
        assert (refs(view), view["active"], view["pinned"]) == ([first], first, [])

        again = restart_agent(agent)
        assert serving(again) == "tiny-llama"


class TestVerify:
    def test_verify_one_model_over_the_socket(self, start_agent):
        agent = start_agent(TINY_GGUF)
        first = ok_json("list", "--socket", agent.socket)["active"]
        assert ok_json("verify", first, "--socket", agent.socket) == {
            "ok": True,
            "results": [{"ref": first, "ok": True, "error": None}],
        }
        human = edgelm_models("verify", "--socket", agent.socket)
        assert human.returncode == 0
        assert f"{first}: ok" in human.stderr

    def test_verify_over_the_socket_names_a_corrupted_model(self, start_agent, short_tmp):
        """As on disk: exit 1, and the JSON results say which model failed and why."""
        agent = start_agent(TINY_GGUF)
        first = ok_json("list", "--socket", agent.socket)["active"]
        bad = ok_json("import", variant_gguf(short_tmp, "bad", 1), "--socket", agent.socket)
        corrupt(blob_dir(agent.workdir) / bad["sha256"])
        result = edgelm_models("verify", "--socket", agent.socket, "--json")
        assert result.returncode == 1, result.stderr
        data = json.loads(result.stdout)
        assert "error" not in data, data  # once {"error": {"reference": "agent-422"}}: a bug
        assert data["ok"] is False
        by_ref = {r["ref"]: r for r in data["results"]}
        assert by_ref[first] == {"ref": first, "ok": True, "error": None}
        assert by_ref[f"bad@{bad['version']}"]["ok"] is False
        assert "corrupted" in by_ref[f"bad@{bad['version']}"]["error"]

    def test_activating_a_corrupted_model_fails_and_the_old_one_serves_on(
        self, start_agent, short_tmp
    ):
        agent = start_agent(TINY_GGUF)
        first = ok_json("list", "--socket", agent.socket)["active"]
        bad = ok_json("import", variant_gguf(short_tmp, "bad", 1), "--socket", agent.socket)
        corrupt(blob_dir(agent.workdir) / bad["sha256"])
        ref = f"bad@{bad['version']}"
        error = error_json("activate", ref, "--socket", agent.socket)
        assert error["reference"] == "agent-activation_failed"
        assert error["message"].startswith(f"{ref} was not activated: blob ")
        assert "changed or corrupted on disk" in error["message"]
        assert serving(agent) == "tiny-llama"
        view = ok_json("list", "--socket", agent.socket)
        assert (view["active"], view["previous"]) == (first, None)
        assert (view["history"][-1]["event"], view["history"][-1]["model"]) == (
            "activation_failed",
            ref,
        )

    def test_state_dir_verify_names_a_corrupted_onnx_file(self, start_agent):
        """One corrupted file of an ONNX folder fails that model only; activating it on disk is
        refused and leaves the state as it was."""
        agent = start_agent(TINY_GGUF)
        first = ok_json("list", "--socket", agent.socket)["active"]
        ok_json("import", TINY_ONNX, "--version", "1.0", "--socket", agent.socket)
        assert agent.stop() == 0
        state_dir = agent.workdir / "state"
        corrupt(blob_dir(agent.workdir) / sha256_of(TINY_ONNX / "model.onnx.data"))

        result = edgelm_models("verify", "--state-dir", state_dir, "--json")
        assert result.returncode == 1
        data = json.loads(result.stdout)
        assert data["ok"] is False
        [good, bad] = data["results"]
        assert good == {"ref": first, "ok": True, "error": None}
        assert (bad["ref"], bad["ok"]) == ("tiny-onnx@1.0", False)
        assert "corrupted" in bad["error"]

        human = edgelm_models("verify", "tiny-onnx@1.0", "--state-dir", state_dir)
        assert human.returncode == 1
        assert "tiny-onnx@1.0: FAILED" in human.stderr
        assert first not in human.stderr  # only the model asked for

        state_before = (state_dir / "registry" / "state.json").read_bytes()
        error = error_json("activate", "tiny-onnx@1.0", "--state-dir", state_dir)
        assert error["reference"] == "registry-target_mismatch"
        assert "corrupted" in error["message"]
        assert (state_dir / "registry" / "state.json").read_bytes() == state_before


class TestStateDir:
    def test_direct_activate_and_rollback_apply_at_the_next_start(self, start_agent, restart_agent):
        """activate and rollback on a stopped agent's files record the change; the agent
        serves what they recorded when it starts."""
        agent = start_agent(TINY_GGUF)
        first = ok_json("list", "--socket", agent.socket)["active"]
        imported = ok_json("import", TINY_ONNX, "--version", "1.0", "--socket", agent.socket)
        assert agent.stop() == 0
        state_dir = agent.workdir / "state"

        assert ok_json("activate", "tiny-onnx@1.0", "--state-dir", state_dir) == imported
        view = ok_json("list", "--state-dir", state_dir)
        assert (view["active"], view["previous"]) == ("tiny-onnx@1.0", first)
        second = restart_agent(agent)
        assert serving(second) == "tiny-onnx"
        assert second.stop() == 0

        rolled = ok_json("rollback", "--state-dir", state_dir)
        assert rolled == target_of(view, first)
        view = ok_json("list", "--state-dir", state_dir)
        assert (view["active"], view["previous"]) == (first, "tiny-onnx@1.0")
        assert view["history"][-1]["event"] == "rolled_back"
        third = restart_agent(agent)
        assert serving(third) == "tiny-llama"

    def test_changes_on_disk_are_refused_while_the_agent_runs(self, start_agent):
        """With --state-dir, commands that would change the registry under a running agent,
        and verify, are refused and change nothing. (`list`: test_registry_lifecycle.py.)"""
        agent = start_agent(TINY_GGUF)
        first = ok_json("list", "--socket", agent.socket)["active"]
        ok_json("import", TINY_ONNX, "--version", "1.0", "--socket", agent.socket)
        state_dir = agent.workdir / "state"
        state_file = state_dir / "registry" / "state.json"
        state_before, blobs_before = state_file.read_bytes(), blobs(agent.workdir)
        for command in (
            ["gc"],
            ["pin", first],
            ["activate", "tiny-onnx@1.0"],
            ["rollback"],
            ["verify"],
            ["import", str(TINY_GGUF), "--version", "2.0"],
        ):
            error = error_json(*command, "--state-dir", state_dir)
            assert error["reference"] == "registry-registry_busy", command
            assert "in use by a running agent" in error["message"]
            assert "--socket" in error["message"]
        assert state_file.read_bytes() == state_before
        assert blobs(agent.workdir) == blobs_before
        assert serving(agent) == "tiny-llama"
