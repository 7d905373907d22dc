"""The signed target schema: what a TUF target must say for an agent to run it. Pure.

The agent parses it, the control plane and provisioning write it; both sides share this module
so that what one signs, the other accepts.

A model is one TUF target at ``models/{name}/{version}/{file}``:

* a GGUF model is the ``.gguf`` file itself;
* an ONNX GenAI model is ``bundle.json``, a manifest pinning every file of the folder by length
  and sha256 (see :mod:`edgelm_agent.registry.bundle`), so one signed hash covers the folder.

The target's ``custom["edgelm"]`` object carries what the agent needs to run it::

    {"name": "smollm2", "version": "1.0.0", "format": "gguf", "backend": "llama.cpp",
     "context_length": 8192, "chat_template": null, "quantization": "Q4_1",
     "min_ram_bytes": 268435456,
     "sampling": {"temperature": "0.7", "top_p": "0.9", "top_k": 40},
     "health_check": {"prompt": "Hello", "max_tokens": 8, "timeout_s": 30,
                      "min_tokens_per_s": "1.5"}}

``role`` says what the model is for: ``generation`` (chat and completions, the default) or
``embedding`` (vectors for ``/v1/embeddings``). It is optional, and written only when it is not
``generation``, so metadata signed before roles existed stays valid and a generation target
signs to the same bytes as before.

``presets`` (optional, written only when there are any) names prompt presets that travel
with the model: a system prompt, a response format or tools, and sampling. Its schema is in
:mod:`edgelm_protocol.presets`. An embedding model takes none.

TUF signs canonical JSON, which has no floating-point numbers, so decimal values are written as
decimal strings (or integers) and parsed here.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from edgelm_protocol.errors import InvalidModelMetadata, UnsafeTargetPath
from edgelm_protocol.ids import MODEL_NAME_PATTERN, MODEL_VERSION_PATTERN
from edgelm_protocol.presets import Preset, parse_presets, presets_custom

#: Below this a model cannot hold its health check, let alone a chat: refused in signed
#: metadata, at import, and in the agent's configuration.
MIN_CONTEXT_LENGTH = 128


@dataclass(frozen=True)
class Sampling:
    """Sampling defaults a model's publisher signs with it; a request's own fields win."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40


NAME_RE = MODEL_NAME_PATTERN
VERSION_RE = MODEL_VERSION_PATTERN
FILENAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
BUNDLE_FILE = "bundle.json"
BACKEND_FOR_FORMAT = {"gguf": "llama.cpp", "onnx": "onnxruntime-genai"}
#: What a model is for: text generation, or embedding vectors.
GENERATION, EMBEDDING = "generation", "embedding"
ROLES = (GENERATION, EMBEDDING)
#: Embeddings are served by llama.cpp only: a model of this role must be a GGUF file.
EMBEDDING_FORMATS = ("gguf",)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidModelMetadata(
            f"model name must be 1-64 of a-z 0-9 . _ - starting with a letter or digit, "
            f"got {name!r}"
        )
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version) or ".." in version:
        raise InvalidModelMetadata(
            f"model version must be 1-64 of A-Z a-z 0-9 . _ + - starting with a letter or "
            f"digit, got {version!r}"
        )
    return version


def target_path(name: str, version: str, filename: str) -> str:
    return f"models/{check_name(name)}/{check_version(version)}/{filename}"


def split_target_path(path: str) -> tuple[str, str, str]:
    """``models/{name}/{version}/{file}`` → its parts, refusing anything that could escape."""
    if not isinstance(path, str) or "\\" in path or any(ord(c) < 32 for c in path):
        raise UnsafeTargetPath(f"target path {path!r} has forbidden characters")
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "models":
        raise UnsafeTargetPath(f"target path {path!r} must be models/NAME/VERSION/FILE")
    _, name, version, filename = parts
    if not FILENAME_RE.fullmatch(filename) or ".." in filename:
        raise UnsafeTargetPath(f"target path {path!r} has an unsafe file name")
    try:
        return check_name(name), check_version(version), filename
    except InvalidModelMetadata as exc:
        raise UnsafeTargetPath(f"target path {path!r}: {exc}") from exc


@dataclass(frozen=True)
class HealthCheck:
    """A short generation that must succeed within budgets before a model goes live."""

    prompt: str = "Hello"
    max_tokens: int = 8
    timeout_s: float = 60.0
    min_tokens_per_s: float = 0.0


@dataclass(frozen=True)
class ModelTarget:
    """A verified model target: where it is, what it is, and how to run it."""

    path: str
    length: int
    sha256: str
    name: str
    version: str
    format: str
    backend: str
    context_length: int
    quantization: str
    min_ram_bytes: int
    chat_template: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    health_check: HealthCheck = field(default_factory=HealthCheck)
    role: str = GENERATION
    #: Prompt presets signed with the model, by name (see :mod:`edgelm_protocol.presets`).
    presets: tuple[Preset, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def preset(self, name: str) -> Preset | None:
        return next((p for p in self.presets if p.name == name), None)

    @property
    def is_bundle(self) -> bool:
        return self.format == "onnx"

    def custom(self) -> dict[str, Any]:
        """The ``custom["edgelm"]`` object this target was parsed from."""
        custom = {
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "backend": self.backend,
            "context_length": self.context_length,
            "chat_template": self.chat_template,
            "quantization": self.quantization,
            "min_ram_bytes": self.min_ram_bytes,
            "sampling": _canonical(asdict(self.sampling)),
            "health_check": _canonical(asdict(self.health_check)),
        }
        if self.role != GENERATION:  # absent means generation (see the module docstring)
            custom["role"] = self.role
        if self.presets:  # absent means none, so targets without presets sign as before
            custom["presets"] = presets_custom(self.presets)
        return custom

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "length": self.length, "sha256": self.sha256, **self.custom()}


def _field(custom: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str) -> Any:
    if key not in custom:
        raise InvalidModelMetadata(f"target {path!r} lacks custom field edgelm.{key}")
    value = custom[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidModelMetadata(f"target {path!r}: edgelm.{key} has the wrong type")
    return value


def _decimal(value: Any, where: str) -> float:
    """A decimal from canonical JSON: an integer or a decimal string (or a float, from our own
    state file)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidModelMetadata(f"{where} must be a number or a decimal string")
    try:
        number = float(value)
    except ValueError as exc:
        raise InvalidModelMetadata(f"{where} must be a number, got {value!r}") from exc
    if not math.isfinite(number) or number < 0:
        raise InvalidModelMetadata(f"{where} must be a finite number >= 0, got {value!r}")
    return number


def _sub(custom: dict[str, Any], key: str, cls: type[Any], path: str) -> Any:
    raw = custom.get(key) or {}
    if not isinstance(raw, dict):
        raise InvalidModelMetadata(f"target {path!r}: edgelm.{key} must be an object")
    defaults = cls()
    values: dict[str, Any] = {}
    for name, item in raw.items():
        where = f"target {path!r}: edgelm.{key}.{name}"
        if not hasattr(defaults, name):
            raise InvalidModelMetadata(f"{where} is not a known field")
        default = getattr(defaults, name)
        if isinstance(default, str):
            if not isinstance(item, str):
                raise InvalidModelMetadata(f"{where} must be a string")
            values[name] = item
        elif isinstance(default, int):
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise InvalidModelMetadata(f"{where} must be an integer >= 0")
            values[name] = item
        else:
            values[name] = _decimal(item, where)
    return cls(**values)


def _canonical(value: Any) -> Any:
    """Floats as decimal strings, the only way canonical JSON can carry them."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else repr(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def parse_model_target(
    path: str,
    length: int,
    hashes: dict[str, str],
    custom: dict[str, Any] | None,
    *,
    min_context_length: int = MIN_CONTEXT_LENGTH,
) -> ModelTarget:
    """Validate a target's path, hashes and custom metadata; raise a precise error if bad."""
    name, version, filename = split_target_path(path)
    sha256 = hashes.get("sha256")
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise InvalidModelMetadata(f"target {path!r} has no sha256 hash")
    edgelm = (custom or {}).get("edgelm")
    if not isinstance(edgelm, dict):
        raise InvalidModelMetadata(f"target {path!r} has no custom 'edgelm' metadata")
    fmt = _field(edgelm, "format", str, path)
    if fmt not in BACKEND_FOR_FORMAT:
        raise InvalidModelMetadata(f"target {path!r}: unknown format {fmt!r}")
    if fmt == "onnx" and filename != BUNDLE_FILE:
        raise InvalidModelMetadata(f"target {path!r}: an ONNX model's target is {BUNDLE_FILE}")
    backend = _field(edgelm, "backend", str, path)
    if backend != BACKEND_FOR_FORMAT[fmt]:
        raise InvalidModelMetadata(
            f"target {path!r}: format {fmt} runs on {BACKEND_FOR_FORMAT[fmt]}, not {backend!r}"
        )
    if _field(edgelm, "name", str, path) != name or _field(edgelm, "version", str, path) != version:
        raise InvalidModelMetadata(f"target {path!r}: edgelm.name/version disagree with its path")
    context_length = _field(edgelm, "context_length", int, path)
    min_ram = _field(edgelm, "min_ram_bytes", int, path)
    if context_length < min_context_length:
        raise InvalidModelMetadata(
            f"target {path!r}: context_length must be at least {min_context_length}, "
            f"got {context_length}"
        )
    if min_ram < 0:
        raise InvalidModelMetadata(f"target {path!r}: min_ram_bytes must be >= 0")
    template = edgelm.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise InvalidModelMetadata(f"target {path!r}: edgelm.chat_template must be a string")
    role = check_role(edgelm.get("role", GENERATION), f"target {path!r}: edgelm.role")
    if role == EMBEDDING and fmt not in EMBEDDING_FORMATS:
        raise InvalidModelMetadata(
            f"target {path!r}: an embedding model must be GGUF (served by llama.cpp), not {fmt}"
        )
    presets = parse_presets(
        edgelm.get("presets"), f"target {path!r}", context_length=context_length
    )
    if presets and role == EMBEDDING:
        raise InvalidModelMetadata(
            f"target {path!r}: an embedding model takes no presets (they shape generations)"
        )
    return ModelTarget(
        path=path,
        length=length,
        sha256=sha256,
        name=name,
        version=version,
        format=fmt,
        backend=backend,
        context_length=context_length,
        quantization=_field(edgelm, "quantization", str, path),
        min_ram_bytes=min_ram,
        chat_template=template,
        sampling=_sub(edgelm, "sampling", Sampling, path),
        health_check=_sub(edgelm, "health_check", HealthCheck, path),
        role=role,
        presets=presets,
    )


def check_role(role: Any, where: str = "model role") -> str:
    """``generation`` or ``embedding``, or a precise error naming what came."""
    if role not in ROLES:
        shown = repr(role) if len(repr(role)) <= 40 else repr(role)[:39] + "…"
        raise InvalidModelMetadata(f"{where} must be generation or embedding, got {shown}")
    return str(role)


def model_target_from_dict(data: dict[str, Any]) -> ModelTarget:
    """Inverse of :meth:`ModelTarget.as_dict`, for records the registry keeps on disk.

    A record an older agent kept with a context too small to serve still loads (the health
    check refuses to activate it), so one bad record cannot make the whole state unreadable.
    """
    return parse_model_target(
        data["path"],
        int(data["length"]),
        {"sha256": data["sha256"]},
        {"edgelm": {k: v for k, v in data.items() if k not in ("path", "length", "sha256")}},
        min_context_length=1,
    )
