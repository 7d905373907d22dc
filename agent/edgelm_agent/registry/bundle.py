"""The ONNX bundle manifest (:mod:`edgelm_protocol.bundle`), with the registry's own errors."""

from __future__ import annotations

from edgelm_agent.registry.model_target import translated
from edgelm_protocol import bundle as manifest
from edgelm_protocol.bundle import MANIFEST_FORMAT, BundleFile

__all__ = ["MANIFEST_FORMAT", "BundleFile", "build_manifest", "parse_manifest"]


def build_manifest(files: list[BundleFile]) -> bytes:
    with translated():
        return manifest.build_manifest(files)


def parse_manifest(raw: bytes) -> list[BundleFile]:
    with translated():
        return manifest.parse_manifest(raw)
