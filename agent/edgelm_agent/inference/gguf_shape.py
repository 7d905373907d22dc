"""Read the few facts of a GGUF header that size its KV cache, without loading the model.

The residency policy must know how much memory a model takes *before* it loads it, so that a
model that cannot fit is refused rather than killed by the OOM killer. The KV cache depends on
the layer count and the key/value width, which only the file's header says. The ``gguf``
package reads headers too, but it is a development dependency; this reader needs only the
standard library and stops at the end of the key-value section (it never touches tensors).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from edgelm_agent.residency import ModelShape

GGUF_MAGIC = b"GGUF"
#: A header with more entries than this is not one we trust to walk.
MAX_KV_ENTRIES = 1 << 16
MAX_STRING_BYTES = 1 << 24

# GGUF value types, and the size of each fixed-width one.
_STRING, _ARRAY = 8, 9
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INTEGER = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


class _HeaderUnreadable(Exception):  # internal signal: read_shape answers None instead
    """The file is not a GGUF file this reader understands."""


def read_shape(path: Path) -> ModelShape | None:
    """The model's layer count and KV width, or ``None`` when the header does not say (or is
    not GGUF): the caller then falls back to a coarser estimate."""
    try:
        with open(path, "rb") as f:
            values = _scalar_values(f)
    except (OSError, _HeaderUnreadable, struct.error):
        return None
    arch = values.get("general.architecture")
    if not isinstance(arch, str):
        return None
    layers = _positive(values.get(f"{arch}.block_count"))
    width = _positive(values.get(f"{arch}.embedding_length"))
    heads = _positive(values.get(f"{arch}.attention.head_count"))
    if layers is None or width is None or heads is None:
        return None
    kv_heads = _positive(values.get(f"{arch}.attention.head_count_kv", heads))
    head_size = _positive(values.get(f"{arch}.attention.key_length", width // heads))
    if kv_heads is None or head_size is None:
        return None
    return ModelShape(layers=layers, kv_width=kv_heads * head_size)


def _positive(value: int | str | None) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def _scalar_values(f: BinaryIO) -> dict[str, int | str]:
    """The header's integer and string values by key (arrays are skipped)."""
    if f.read(4) != GGUF_MAGIC:
        raise _HeaderUnreadable("not a GGUF file")
    (version,) = struct.unpack("<I", _exact(f, 4))
    if version < 2:
        raise _HeaderUnreadable(f"GGUF version {version} is not supported")
    _tensors, entries = struct.unpack("<QQ", _exact(f, 16))
    if entries > MAX_KV_ENTRIES:
        raise _HeaderUnreadable(f"{entries} header entries")
    values: dict[str, int | str] = {}
    for _ in range(entries):
        key = _string(f)
        (kind,) = struct.unpack("<I", _exact(f, 4))
        if kind == _STRING:
            values[key] = _string(f)
        elif kind == _ARRAY:
            _skip_array(f)
        elif kind in _INTEGER:
            (values[key],) = struct.unpack(_INTEGER[kind], _exact(f, _FIXED[kind]))
        elif kind in _FIXED:
            f.seek(_FIXED[kind], 1)
        else:
            raise _HeaderUnreadable(f"unknown value type {kind}")
    return values


def _skip_array(f: BinaryIO) -> None:
    kind, count = struct.unpack("<IQ", _exact(f, 12))
    if kind in _FIXED:
        f.seek(_FIXED[kind] * count, 1)
    elif kind == _STRING:
        for _ in range(count):
            (n,) = struct.unpack("<Q", _exact(f, 8))
            f.seek(n, 1)
    elif kind == _ARRAY:
        for _ in range(count):
            _skip_array(f)
    else:
        raise _HeaderUnreadable(f"unknown array type {kind}")


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _exact(f, 8))
    if n > MAX_STRING_BYTES:
        raise _HeaderUnreadable(f"a header string of {n} bytes")
    return _exact(f, n).decode("utf-8", errors="replace")


def _exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _HeaderUnreadable("the header ends early")
    return data
