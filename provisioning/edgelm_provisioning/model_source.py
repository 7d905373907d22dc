"""A model on the operator's disk, hashed and ready to publish: a GGUF file or an ONNX folder.

What becomes the TUF target, as the agent's registry expects it
(:mod:`edgelm_protocol.targets`, :mod:`edgelm_protocol.bundle`):

* a GGUF file is the target itself, ``models/N/V/model.gguf``;
* an ONNX GenAI folder becomes ``models/N/V/bundle.json``, a manifest pinning every member by
  length and sha256 (one signed hash covers the folder); the members travel as blobs of their
  own, named by their hash.

The folder may hold regular files and directories only (no links, devices or FIFOs) and must
hold ``genai_config.json`` at its top, as the agent's own import requires.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgelm_protocol.bundle import MAX_DEPTH, MAX_FILES, BundleFile, build_manifest
from edgelm_protocol.errors import TargetRefused
from edgelm_protocol.targets import BUNDLE_FILE
from edgelm_provisioning.errors import InvalidModelSource

GGUF_MAGIC = b"GGUF"
GGUF_FILE = "model.gguf"
ONNX_CONFIG = "genai_config.json"
CHUNK_BYTES = 1 << 20

HashProgress = Callable[[int, int], None]  # (bytes hashed so far, bytes in all)


@dataclass(frozen=True)
class Blob:
    """One file to upload, named by its sha256: on disk (``path``) or in memory (``data``)."""

    sha256: str
    length: int
    name: str
    path: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class PreparedModel:
    source: Path
    format: str  # "gguf" or "onnx"
    filename: str  # the target's file name: model.gguf or bundle.json
    sha256: str  # of the target (the GGUF file, or the manifest)
    length: int
    #: What the control plane needs: the target's blob first, then bundle members, each once.
    blobs: tuple[Blob, ...]
    #: Bytes of the model's files, from which the default minimum RAM is estimated.
    model_bytes: int


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file (device, FIFO or socket)"


def _members(folder: Path) -> list[str]:
    """Every regular file under ``folder``, as sorted '/'-separated relative paths."""
    found: list[str] = []

    def walk(directory: Path, prefix: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise InvalidModelSource(folder, f"{directory} is nested over {MAX_DEPTH} deep")
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            relative = prefix + entry.name
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                walk(Path(entry.path), relative + "/", depth + 1)
            elif stat.S_ISREG(mode):
                found.append(relative)
                if len(found) > MAX_FILES:
                    raise InvalidModelSource(folder, f"{folder} holds over {MAX_FILES} files")
            else:
                raise InvalidModelSource(
                    folder,
                    f"{entry.path} is {_kind(mode)}; a model folder may hold only regular files",
                    hint="copy the folder with links resolved (cp -rL) and push the copy",
                )

    walk(folder, "", 1)
    return found


def _hash_file(path: Path, on_bytes: Callable[[int], None]) -> tuple[str, int]:
    digest = hashlib.sha256()
    length = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            length += len(chunk)
            on_bytes(len(chunk))
    return digest.hexdigest(), length


def prepare_model(source: Path, progress: HashProgress = lambda done, total: None) -> PreparedModel:
    """Check and hash ``source``; raise :class:`InvalidModelSource` if it cannot be a model."""
    try:
        mode = source.stat().st_mode  # the path typed may be a link; what is inside may not
    except OSError as exc:
        raise InvalidModelSource(source, f"cannot read {source}: {exc.strerror}") from exc
    if stat.S_ISREG(mode):
        return _prepare_gguf(source, progress)
    if stat.S_ISDIR(mode):
        return _prepare_onnx(source, progress)
    raise InvalidModelSource(source, f"{source} is {_kind(mode)}, not a GGUF file or a folder")


def _prepare_gguf(source: Path, progress: HashProgress) -> PreparedModel:
    with source.open("rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise InvalidModelSource(
                source,
                f"{source} is not a GGUF file (it does not start with 'GGUF')",
                hint="push a .gguf file, or an ONNX GenAI folder (with genai_config.json)",
            )
    total = source.stat().st_size
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    sha256, length = _hash_file(source, on_bytes)
    blob = Blob(sha256, length, source.name, path=source)
    return PreparedModel(source, "gguf", GGUF_FILE, sha256, length, (blob,), length)


def _prepare_onnx(source: Path, progress: HashProgress) -> PreparedModel:
    members = _members(source)
    if ONNX_CONFIG not in members:
        raise InvalidModelSource(
            source,
            f"{source} is a folder without {ONNX_CONFIG}, so not an ONNX GenAI model",
            hint="push the folder onnxruntime-genai's model builder wrote",
        )
    total = sum((source / m).stat().st_size for m in members)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    files: list[BundleFile] = []
    blobs: dict[str, Blob] = {}
    for member in members:
        sha256, length = _hash_file(source / member, on_bytes)
        files.append(BundleFile(member, length, sha256))
        blobs.setdefault(sha256, Blob(sha256, length, member, path=source / member))
    try:
        manifest = build_manifest(files)
    except TargetRefused as exc:
        raise InvalidModelSource(source, f"{source}: {exc}") from exc
    sha256 = hashlib.sha256(manifest).hexdigest()
    manifest_blob = Blob(sha256, len(manifest), BUNDLE_FILE, data=manifest)
    return PreparedModel(
        source,
        "onnx",
        BUNDLE_FILE,
        sha256,
        len(manifest),
        (manifest_blob, *blobs.values()),
        sum(f.length for f in files),
    )
