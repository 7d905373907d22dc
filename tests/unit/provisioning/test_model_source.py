"""A model on disk, checked and hashed for publishing: a GGUF file or an ONNX GenAI folder."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from edgelm_protocol.bundle import parse_manifest
from edgelm_provisioning.errors import InvalidModelSource
from edgelm_provisioning.model_source import prepare_model
from tests.agent_process import TINY_GGUF, TINY_ONNX


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TestGguf:
    def test_the_file_is_the_target(self):
        """A GGUF file is one blob, the target itself, named model.gguf."""
        prepared = prepare_model(TINY_GGUF)
        assert (prepared.format, prepared.filename) == ("gguf", "model.gguf")
        assert prepared.sha256 == sha256(TINY_GGUF)
        assert prepared.length == TINY_GGUF.stat().st_size
        assert [(b.sha256, b.path) for b in prepared.blobs] == [(prepared.sha256, TINY_GGUF)]

    def test_progress_reaches_the_whole_size(self):
        """Hashing reports progress up to the file's size."""
        seen: list[tuple[int, int]] = []
        prepare_model(TINY_GGUF, lambda done, total: seen.append((done, total)))
        size = TINY_GGUF.stat().st_size
        assert seen[-1] == (size, size)

    def test_a_file_without_the_magic_is_refused(self, tmp_path):
        """A file that does not start with 'GGUF' is refused with its path."""
        bogus = tmp_path / "model.gguf"
        bogus.write_bytes(b"GGML old format")
        with pytest.raises(InvalidModelSource) as caught:
            prepare_model(bogus)
        assert caught.value.path == bogus

    def test_a_missing_path_is_refused(self, tmp_path):
        """A path that does not exist is an InvalidModelSource, not an OSError."""
        with pytest.raises(InvalidModelSource):
            prepare_model(tmp_path / "nope.gguf")


class TestOnnx:
    def test_the_manifest_pins_every_member(self):
        """The target is bundle.json listing each file with its length and sha256."""
        prepared = prepare_model(TINY_ONNX)
        assert (prepared.format, prepared.filename) == ("onnx", "bundle.json")
        manifest = prepared.blobs[0]
        assert manifest.data is not None
        assert prepared.sha256 == hashlib.sha256(manifest.data).hexdigest()
        members = {m.path: m for m in parse_manifest(manifest.data)}
        assert set(members) == {p.name for p in TINY_ONNX.iterdir()}
        for name, member in members.items():
            assert member.sha256 == sha256(TINY_ONNX / name)

    def test_every_member_is_a_blob_once(self, tmp_path):
        """Members with the same bytes are uploaded once, under their hash."""
        folder = tmp_path / "m"
        shutil.copytree(TINY_ONNX, folder)
        shutil.copy(folder / "tokenizer.json", folder / "copy-of-tokenizer.json")
        prepared = prepare_model(folder)
        digests = [b.sha256 for b in prepared.blobs[1:]]
        assert len(digests) == len(set(digests)) == len(list(TINY_ONNX.iterdir()))

    def test_the_same_folder_gives_the_same_manifest(self, tmp_path):
        """The manifest is canonical: a copy of the folder hashes the same."""
        copy = tmp_path / "copy"
        shutil.copytree(TINY_ONNX, copy)
        assert prepare_model(copy).sha256 == prepare_model(TINY_ONNX).sha256

    def test_a_folder_without_genai_config_is_refused(self, tmp_path):
        """A folder that is not an ONNX GenAI model is refused."""
        folder = tmp_path / "m"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"x")
        with pytest.raises(InvalidModelSource, match=r"genai_config\.json"):
            prepare_model(folder)

    def test_a_fifo_inside_is_refused(self, tmp_path):
        """Only regular files may be members: a FIFO is refused, named."""
        folder = tmp_path / "m"
        shutil.copytree(TINY_ONNX, folder)
        os.mkfifo(folder / "pipe")
        with pytest.raises(InvalidModelSource, match="pipe"):
            prepare_model(folder)

    def test_a_hidden_file_name_is_refused(self, tmp_path):
        """A member name outside the bundle's file alphabet (.DS_Store) is refused."""
        folder = tmp_path / "m"
        shutil.copytree(TINY_ONNX, folder)
        (folder / ".DS_Store").write_bytes(b"x")
        with pytest.raises(InvalidModelSource):
            prepare_model(folder)
