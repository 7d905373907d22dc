"""Imports read only what the caller could name safely, and never change a version.

In-process against a real registry on disk, and through a running agent's socket.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from edgelm_agent.api.errors import http_status
from edgelm_agent.registry.errors import (
    InvalidModelMetadata,
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
