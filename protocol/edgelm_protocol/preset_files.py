"""An operator's presets file, as the signed ``presets`` object. Pure: bytes in.

``edgelm models import --presets FILE`` and ``edgelm fleet models push --presets FILE`` both
read it through here, so a file means the same on a device and on the operator's machine.

The file is TOML (``.toml``) or JSON (``.json``). Its top level is the presets object itself,
one table per preset name; in TOML a long system prompt reads well as a ``\"\"\"`` string::

    [extract]
    description = "Invoice fields as JSON"
    system = \"\"\"You read invoices. Answer with their fields only.\"\"\"
    sampling = { temperature = 0.2, max_tokens = 256 }

    [extract.response_format]
    type = "json_schema"
    json_schema = { name = "invoice", schema = { type = "object", ... } }

TUF signs canonical JSON, which has no floating-point numbers, so the file is converted: the
sampling decimals become decimal strings (``"0.2"``), as the target's own ``sampling``; a whole
number written as a float (TOML's ``minimum = 0.0``) becomes an integer, which JSON Schema
holds equal; any other fraction in a schema or a tool cannot be signed and is refused, naming
its place.
"""

from __future__ import annotations

import math
import tomllib
from typing import Any

from edgelm_protocol.errors import InvalidModelMetadata, ProtocolError, shown
from edgelm_protocol.presets import decimal_text, parse_presets
from edgelm_protocol.strict_json import loads_strict

#: A presets file larger than this is not a file of prompts; its signed form is held to
#: :data:`edgelm_protocol.presets.MAX_PRESETS_BYTES`, and TOML spells the same out at length.
MAX_FILE_BYTES = 1 << 20
SUFFIXES = (".toml", ".json")


def presets_from_document(data: bytes, *, suffix: str) -> dict[str, Any]:
    """The signed ``presets`` object of a presets file, checked, or
    :class:`InvalidModelMetadata` saying what is wrong and where. ``suffix`` is the file's
    (``.toml`` or ``.json``) and says how to read it."""
    if len(data) > MAX_FILE_BYTES:
        raise InvalidModelMetadata(
            f"a presets file must be at most {MAX_FILE_BYTES} bytes, got {len(data)}"
        )
    document = _read(data, suffix.lower())
    if not isinstance(document, dict) or not document:
        raise InvalidModelMetadata(
            "a presets file holds one table (or JSON object) per preset name, and at least one"
        )
    signed: dict[str, Any] = {}
    for name, preset in document.items():
        if not isinstance(preset, dict):
            raise InvalidModelMetadata(
                f"presets file: {shown(name)} must be a table of preset fields, got "
                f"{type(preset).__name__}"
            )
        signed[name] = {
            key: (
                {k: _sampling_value(v, f"presets.{name}.sampling.{k}") for k, v in value.items()}
                if key == "sampling" and isinstance(value, dict)
                else _signable(value, f"presets.{name}.{key}")
            )
            for key, value in preset.items()
        }
    parse_presets(signed, "presets file", field_name="presets")
    return signed


def _read(data: bytes, suffix: str) -> Any:
    if suffix not in SUFFIXES:
        raise InvalidModelMetadata(
            f"a presets file must end in .toml or .json, got {shown(suffix or 'no suffix')}"
        )
    if suffix == ".json":
        try:
            return loads_strict(data, max_depth=96)
        except ProtocolError as exc:
            raise InvalidModelMetadata(f"the presets file is not valid JSON: {exc}") from exc
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidModelMetadata(f"the presets file is not UTF-8: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidModelMetadata(f"the presets file is not valid TOML: {exc}") from exc


def _sampling_value(value: Any, path: str) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidModelMetadata(f"presets file: {path} must be finite, got {value!r}")
        return decimal_text(value)
    return _signable(value, path)


def _signable(value: Any, path: str) -> Any:
    """``value`` as canonical JSON can carry it, or an error naming where it cannot."""
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise InvalidModelMetadata(
            f"presets file: {path} is the fraction {value!r}; signed metadata (canonical JSON) "
            "carries no fractions, so write a whole number"
        )
    if isinstance(value, dict):
        return {k: _signable(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_signable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | str):
        return value
    raise InvalidModelMetadata(
        f"presets file: {path} must be a JSON value, got {type(value).__name__}"
    )
