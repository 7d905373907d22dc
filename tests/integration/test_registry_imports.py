"""Imports read only what the caller could name safely, and never change a version.

In-process against a real registry on disk, and through a running agent's socket.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import threading
from pathlib import Path

import pytest

from edgelm_agent.api.errors import http_status
from edgelm_agent.registry.bundle import parse_manifest
from edgelm_agent.registry.errors import (
    InsufficientSpace,
    InvalidModelMetadata,
    RegistryError,
    UnsafeSource,
    VersionConflict,
)
from edgelm_agent.registry.registry import Registry, RegistryConfig
from tests.agent_process import TINY_GGUF, TINY_ONNX


@pytest.fixture
def registry(short_tmp: Path) -> Registry:
    return Registry(RegistryConfig(root=short_tmp / "state" / "registry"))


@pytest.fixture
def secret(short_tmp: Path) -> Path:
    """A file only its owner may read, like the agent's own signing key."""
    path = short_tmp / "secret.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\nnot for you\n")
    path.chmod(0o600)
    return path


def onnx_copy(short_tmp: Path, name: str = "model-dir") -> Path:
    folder = short_tmp / name
    shutil.copytree(TINY_ONNX, folder)
    return folder


def blobs(registry: Registry) -> set[str]:
    return registry.blobs.blob_digests()


class TestLinksAreRefused:
    def test_a_file_link_inside_an_onnx_folder_is_refused(self, registry, short_tmp, secret):
        """An ONNX folder holding a link to a file only the agent may read is refused, and
        nothing of it reaches the blob store."""
        folder = onnx_copy(short_tmp)
        (folder / "extra.txt").symlink_to(secret)
        before = blobs(registry)
        with pytest.raises(UnsafeSource, match="symbolic link"):
            registry.import_model(folder)
        assert blobs(registry) == before

    def test_a_link_at_any_depth_is_refused(self, registry, short_tmp, secret):
        """A link two folders down is found too."""
        folder = onnx_copy(short_tmp)
        deep = folder / "a" / "b"
        deep.mkdir(parents=True)
        (deep / "weights.bin").symlink_to(secret)
        with pytest.raises(UnsafeSource, match=r"a/b/weights\.bin"):
            registry.import_model(folder)

    def test_a_directory_link_is_refused(self, registry, short_tmp):
        """A link to a directory (which could point into the state directory) is refused."""
        folder = onnx_copy(short_tmp)
        (folder / "keys").symlink_to(registry.config.root, target_is_directory=True)
        with pytest.raises(UnsafeSource, match="symbolic link"):
            registry.import_model(folder)

    def test_the_named_path_itself_may_not_be_a_link(self, registry, short_tmp):
        """A link named directly, to a GGUF file or to a folder, is refused."""
        link = short_tmp / "model.gguf"
        link.symlink_to(TINY_GGUF)
        with pytest.raises(UnsafeSource, match="symbolic link"):
            registry.import_model(link)
        folder_link = short_tmp / "folder-link"
        folder_link.symlink_to(TINY_ONNX, target_is_directory=True)
        with pytest.raises(UnsafeSource, match="symbolic link"):
            registry.import_model(folder_link)

    def test_special_files_are_refused(self, registry, short_tmp):
        """A FIFO in a model folder (which would block a reader) is refused."""
        folder = onnx_copy(short_tmp)
        os.mkfifo(folder / "pipe")
        with pytest.raises(UnsafeSource, match="special file"):
            registry.import_model(folder)

    def test_a_regular_folder_still_imports(self, registry, short_tmp):
        """The checks refuse links, not models: a plain copy of the folder imports."""
        target = registry.import_model(onnx_copy(short_tmp), name="plain", version="1.0")
        assert target.ref == "plain@1.0"


class TestVersionConflicts:
    def test_other_content_under_an_existing_version_is_409_and_leaves_no_blob(
        self, registry, short_tmp
    ):
        """Versions never change: other bytes under name@version are refused before anything
        is copied."""
        registry.import_model(TINY_GGUF, name="tiny", version="1.0")
        other = short_tmp / "other.gguf"
        other.write_bytes(TINY_GGUF.read_bytes() + b"\x00" * 64)
        before = blobs(registry)
        with pytest.raises(VersionConflict) as refused:
            registry.import_model(other, name="tiny", version="1.0")
        assert http_status(refused.value) == (409, "registry_error")
        assert blobs(registry) == before

    def test_an_onnx_folder_under_a_gguf_version_is_a_conflict(self, registry):
        """Another format under the same name@version is a conflict too."""
        registry.import_model(TINY_GGUF, name="tiny", version="1.0")
        with pytest.raises(VersionConflict):
            registry.import_model(TINY_ONNX, name="tiny", version="1.0")

    def test_the_same_content_again_is_not_a_conflict(self, registry):
        """Importing identical bytes under the same version returns the same model."""
        first = registry.import_model(TINY_GGUF, name="tiny", version="1.0")
        again = registry.import_model(TINY_GGUF, name="tiny", version="1.0")
        assert again == first


class TestContextLength:
    @pytest.mark.parametrize("context_length", [1, 8, 127])
    def test_a_context_too_small_to_serve_is_refused_at_import(self, registry, context_length):
        """A model that could not answer any request is refused when it is imported."""
        with pytest.raises(InvalidModelMetadata, match="at least 128"):
            registry.import_model(TINY_GGUF, context_length=context_length)


class TestPermissions:
    def test_keys_are_private(self, registry):
        """The local signing keys' folder is the agent's alone, each key 0600."""
        registry.import_model(TINY_GGUF)
        keys = registry.config.root / "local-keys"
        assert stat.S_IMODE(keys.stat().st_mode) == 0o700
        assert {stat.S_IMODE(p.stat().st_mode) for p in keys.iterdir()} == {0o600}


class TestOverTheSocket:
    def test_import_refusals_are_clear_4xx_and_the_agent_serves_on(
        self, start_agent, short_tmp, secret
    ):
        """Over the API: a link inside a folder is 422 unsafe_source; a changed version is
        409 version_conflict; a tiny context is 400; the agent answers throughout."""
        agent = start_agent()
        folder = onnx_copy(short_tmp)
        (folder / "stolen.pem").symlink_to(secret)
        status, body = agent.request("POST", "/v1/registry/import", {"path": str(folder)})
        assert status == 422
        assert body["error"]["code"] == "unsafe_source"

        other = short_tmp / "other.gguf"
        other.write_bytes(TINY_GGUF.read_bytes() + b"\x00" * 64)
        ok = {"path": str(TINY_GGUF), "name": "pinned", "version": "1.0"}
        assert agent.request("POST", "/v1/registry/import", ok)[0] == 201
        status, body = agent.request("POST", "/v1/registry/import", {**ok, "path": str(other)})
        assert status == 409
        assert body["error"]["code"] == "version_conflict"

        status, body = agent.request(
            "POST", "/v1/registry/import", {"path": str(TINY_GGUF), "context_length": 8}
        )
        assert status == 400
        assert body["error"]["param"] == "context_length"
        assert agent.request("GET", "/readyz")[0] == 200


def swap_for_link(folder: Path, elsewhere: Path) -> None:
    """Move ``folder`` aside and put a link to ``elsewhere`` in its place, as an attacker who
    owns the parent folder can at any moment."""
    folder.rename(folder.with_name(folder.name + ".real"))
    folder.symlink_to(elsewhere, target_is_directory=True)


class TestTheTreeScannedIsTheTreeRead:
    """What an import hashes and copies is the tree it scanned, whatever happens to its path."""

    @pytest.fixture
    def attack(self, short_tmp: Path, secret: Path) -> tuple[Path, Path, bytes]:
        """An ONNX folder ``att/model`` to import, and ``evil/model`` beside it: the same
        member names, each holding the secret instead."""
        folder = short_tmp / "att" / "model"
        folder.parent.mkdir()
        shutil.copytree(TINY_ONNX, folder)
        evil = short_tmp / "evil" / "model"
        shutil.copytree(TINY_ONNX, evil)
        for member in evil.rglob("*"):
            if member.is_file():
                member.write_bytes(secret.read_bytes())
        return folder, evil, secret.read_bytes()

    def test_a_parent_folder_swapped_for_a_link_mid_import_redirects_nothing(
        self, registry: Registry, attack: tuple[Path, Path, bytes]
    ) -> None:
        """A link swapped into a folder above the named path while the first member is
        hashed changes nothing: the later members are read from the tree that was scanned,
        and the secret the link points at never reaches the blob store."""
        folder, evil, secret = attack
        swapped: list[bool] = []

        def swap_once(phase: str, done: int, total: int) -> None:
            if not swapped:
                swap_for_link(folder.parent, evil.parent)
                swapped.append(True)

        target = registry.import_model(folder, name="att", version="1", progress=swap_once)
        assert swapped
        assert hashlib.sha256(secret).hexdigest() not in blobs(registry)
        scanned = folder.parent.with_name("att.real") / "model"
        members = parse_manifest(registry.blobs.blob_path(target.sha256).read_bytes())
        for member in members:
            expected = hashlib.sha256((scanned / member.path).read_bytes()).hexdigest()
            assert member.sha256 == expected, member.path

    def test_a_member_replaced_after_the_scan_is_refused(
        self, registry: Registry, short_tmp: Path
    ) -> None:
        """A member swapped for another file between the scan and its read is refused: what
        was scanned is what is read, or nothing."""
        folder = onnx_copy(short_tmp)
        last = sorted(p for p in folder.rglob("*") if p.is_file())[-1]
        replaced: list[bool] = []

        def replace_last(phase: str, done: int, total: int) -> None:
            if not replaced:  # renamed over it: another file, as an attacker swaps one in
                other = last.with_name("other")
                other.write_bytes(b"something else")
                other.replace(last)
                replaced.append(True)

        before = blobs(registry)
        with pytest.raises(UnsafeSource, match="changed"):
            registry.import_model(folder, progress=replace_last)
        assert blobs(registry) == before

    @pytest.mark.timeout(120)
    def test_a_fifo_swapped_in_mid_import_is_refused_without_blocking(
        self, registry: Registry, short_tmp: Path
    ) -> None:
        """A member swapped for a FIFO while the first member is hashed is refused at once:
        opening it never waits for a writer, so no thread is held for ever."""
        folder = onnx_copy(short_tmp)
        last = sorted(p for p in folder.rglob("*") if p.is_file())[-1]
        outcome: list[BaseException | None] = []

        def to_fifo(phase: str, done: int, total: int) -> None:
            if last.exists() and not stat.S_ISFIFO(last.lstat().st_mode):
                last.unlink()
                os.mkfifo(last)

        def run() -> None:
            try:
                registry.import_model(folder, progress=to_fifo)
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(60)  # a safety net only: the refusal comes at once
        blocked = worker.is_alive()
        if blocked:  # the thread waits in open() for a writer: be one, to release it
            os.close(os.open(last, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(30)
        assert not blocked, "opening the FIFO blocked the importing thread"
        assert isinstance(outcome[0], UnsafeSource)


class TestImportsAreBounded:
    def test_disk_space_is_checked_before_anything_is_hashed(self, short_tmp: Path) -> None:
        """An import that cannot fit is refused right after the scan, before it spends time
        hashing what it could never store."""
        registry = Registry(
            RegistryConfig(root=short_tmp / "state" / "registry", free_margin_bytes=1 << 60)
        )
        hashed: list[int] = []
        with pytest.raises(InsufficientSpace):
            registry.import_model(TINY_GGUF, progress=lambda phase, d, t: hashed.append(d))
        assert hashed == []

    def test_an_import_is_cancelled_between_chunks_and_leaves_nothing(
        self, registry: Registry, short_tmp: Path
    ) -> None:
        """Setting the cancel event stops hashing or copying at the next chunk; no blob and
        no staging file is left."""
        cancel = threading.Event()
        before = blobs(registry)
        with pytest.raises(RegistryError) as stopped:
            registry.import_model(
                onnx_copy(short_tmp), progress=lambda *_: cancel.set(), cancel=cancel
            )
        assert stopped.value.code == "cancelled"
        assert blobs(registry) == before
        assert list(registry.blobs.staging.iterdir()) == []

    def test_a_context_length_past_the_upper_bound_is_refused(self, registry: Registry) -> None:
        """A context length over 1,048,576 tokens is refused at import, never signed."""
        with pytest.raises(InvalidModelMetadata, match="1048576"):
            registry.import_model(TINY_GGUF, context_length=10**30)


class TestImportFieldsOverTheSocket:
    def test_bad_fields_are_400_naming_the_field(self, start_agent) -> None:
        """A bad name, version or context length is a 400 invalid_request naming its field,
        as for every other bad field."""
        agent = start_agent(None, ready=False).wait_alive()
        for body, param in (
            ({"name": "Bad Name!"}, "name"),
            ({"version": "../1"}, "version"),
            ({"context_length": 10**30}, "context_length"),
        ):
            status, answer = agent.request(
                "POST", "/v1/registry/import", {"path": str(TINY_GGUF), **body}
            )
            assert status == 400, answer
            assert answer["error"]["code"] == "invalid_request"
            assert answer["error"]["param"] == param
        status, answer = agent.request("POST", "/v1/registry/install", {"name": "Bad Name!"})
        assert status == 400, answer
        assert answer["error"]["param"] == "name"


def with_trained_context(short_tmp: Path, tokens: int) -> Path:
    """A copy of the tiny model whose GGUF header says it was trained on ``tokens`` tokens."""
    data = bytearray(TINY_GGUF.read_bytes())
    key = b"llama.context_length"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUF value type uint32
    struct.pack_into("<I", data, at + 4, tokens)
    path = short_tmp / f"ctx{tokens}.gguf"
    path.write_bytes(bytes(data))
    return path


class TestServedContext:
    def test_a_model_trained_on_too_short_a_context_fails_activation(
        self, start_agent, short_tmp
    ) -> None:
        """The context a model serves is capped at its trained length, which the signed
        metadata may not know: one below 128 tokens fails activation with a reason, and the
        model already serving goes on."""
        agent = start_agent()
        path = with_trained_context(short_tmp, 40)
        body = {"path": str(path), "name": "short", "version": "1"}
        assert agent.request("POST", "/v1/registry/import", body)[0] == 201
        status, answer = agent.request("POST", "/v1/registry/activate", {"model": "short@1"})
        assert status == 422, answer
        assert answer["error"]["code"] == "activation_failed"
        assert "40 tokens" in answer["error"]["message"]
        assert agent.request("GET", "/readyz")[1]["model"] == "tiny-llama"
