"""The signed target schema (:mod:`edgelm_protocol.targets`), with the registry's own errors.

The schema lives in the protocol package because the control plane and provisioning write what
the agent reads. This adapter is the boundary: it re-exports the schema and translates the
protocol's errors into the registry's (``raise ... from exc``), so everything in the agent
catches and maps registry errors only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.presets import check_preset
from edgelm_agent.inference.types import MAX_CONTEXT_LENGTH
from edgelm_agent.registry.errors import InvalidModelMetadata, TargetMismatch, UnsafeTargetPath
from edgelm_protocol import errors as protocol_errors
from edgelm_protocol import targets as schema
from edgelm_protocol.presets import Preset, parse_presets
from edgelm_protocol.targets import (
    BACKEND_FOR_FORMAT,
    BUNDLE_FILE,
    EMBEDDING,
    FILENAME_RE,
    GENERATION,
    MIN_CONTEXT_LENGTH,
    NAME_RE,
    ROLES,
    VERSION_RE,
    HealthCheck,
    ModelTarget,
    Sampling,
    target_path,
)

__all__ = [
    "BACKEND_FOR_FORMAT",
    "BUNDLE_FILE",
    "EMBEDDING",
    "FILENAME_RE",
    "GENERATION",
    "MIN_CONTEXT_LENGTH",
    "NAME_RE",
    "ROLES",
    "VERSION_RE",
    "HealthCheck",
    "ModelTarget",
    "Sampling",
    "check_name",
    "check_presets",
    "check_role",
    "check_version",
    "model_target_from_dict",
    "parse_model_target",
    "split_target_path",
    "target_path",
    "translated",
]


@contextmanager
def translated() -> Iterator[None]:
    """Protocol errors about targets and bundles, raised as the registry's."""
    try:
        yield
    except protocol_errors.UnsafeTargetPath as exc:
        raise UnsafeTargetPath(str(exc)) from exc
    except protocol_errors.InvalidBundle as exc:
        raise TargetMismatch(str(exc)) from exc
    except protocol_errors.TargetRefused as exc:
        raise InvalidModelMetadata(str(exc)) from exc


def check_name(name: str) -> str:
    with translated():
        return schema.check_name(name)


def check_version(version: str) -> str:
    with translated():
        return schema.check_version(version)


def check_role(role: str) -> str:
    with translated():
        return schema.check_role(role)


def split_target_path(path: str) -> tuple[str, str, str]:
    with translated():
        return schema.split_target_path(path)


def parse_model_target(
    path: str,
    length: int,
    hashes: dict[str, str],
    custom: dict[str, Any] | None,
    *,
    min_context_length: int = MIN_CONTEXT_LENGTH,
) -> ModelTarget:
    with translated():
        target = schema.parse_model_target(
            path, length, hashes, custom, min_context_length=min_context_length
        )
    # The schema has no upper bound (yet); a context this large is a mistake or an attack on
    # the device's memory, so the agent refuses it before anything is installed.
    if target.context_length > MAX_CONTEXT_LENGTH:
        raise InvalidModelMetadata(
            f"target {path!r}: context_length must be at most {MAX_CONTEXT_LENGTH}, "
            f"got {target.context_length}"
        )
    _check_with_the_api(target.presets, f"target {path!r}")
    return target


def check_presets(raw: Any, *, context_length: int) -> tuple[Preset, ...]:
    """A ``presets`` object about to be signed (``edgelm models import --presets``), checked
    as the schema and the API would check it once signed."""
    with translated():
        presets = parse_presets(raw, "import", context_length=context_length, field_name="presets")
    _check_with_the_api(presets, "import")
    return presets


def _check_with_the_api(presets: tuple[Preset, ...], where: str) -> None:
    """Each preset's schema and tools through the request parsers, grammar included: a preset
    the API would refuse is refused when its model is imported or installed, not when a
    request selects it on a device far away."""
    for preset in presets:
        try:
            check_preset(preset)
        except InvalidRequest as exc:
            raise InvalidModelMetadata(
                f"{where}: preset {preset.name!r} would be refused by the API: {exc}"
            ) from exc


def model_target_from_dict(data: dict[str, Any]) -> ModelTarget:
    with translated():
        return schema.model_target_from_dict(data)
