"""The next targets metadata of a fleet: one model added, version + 1, signed offline. Pure.

``models push`` takes the targets metadata it verified against the fleet's root
(:mod:`edgelm_provisioning.repository_check`), and this module makes the next version: the
same targets plus the new one, whose ``custom["edgelm"]`` is checked by the very parser the
agent runs (:func:`edgelm_protocol.targets.parse_model_target`) before anything is signed, so
the operator cannot publish a target every device would refuse. Nothing here does I/O: bytes
and metadata objects in, signed metadata or a typed error out.

A version, once published, never changes: pushing ``name@version`` again with other content
(or other settings) is refused; pushing exactly the same target again is reported as already
published, so a script may safely retry a push whose answer it did not see.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from edgelm_protocol.errors import TargetRefused
from edgelm_protocol.presets import parse_presets, presets_custom
from edgelm_protocol.targets import (
    BACKEND_FOR_FORMAT,
    GENERATION,
    ModelTarget,
    check_name,
    check_version,
    parse_model_target,
    target_path,
)
from edgelm_provisioning.errors import AlreadyIssued, FleetDirError, InvalidValue
from edgelm_provisioning.model_source import PreparedModel

#: How long a push's signature holds. Devices install nothing new once targets expire (the
#: active model keeps serving), so the operator re-signs before then by pushing.
TARGETS_EXPIRY = datetime.timedelta(days=180)
#: RAM a model needs beyond its files' size, as the agent's own import estimates it.
RAM_FACTOR = 1.2
SERIALIZER = JSONSerializer(compact=False)


@dataclass(frozen=True)
class ModelSettings:
    """What the operator says about a model besides its bytes."""

    name: str
    version: str
    context_length: int = 4096
    quantization: str = "unknown"
    min_ram_bytes: int | None = None  # None: estimated from the files' size
    chat_template: str | None = None
    role: str = GENERATION  # or "embedding": served at /v1/embeddings
    #: Prompt presets signed with the model (edgelm_protocol.presets' signed form).
    presets: dict[str, Any] | None = None


@dataclass(frozen=True)
class NewTarget:
    path: str
    info: TargetFile
    model: ModelTarget  # as the agent will parse it

    def as_dict(self) -> dict[str, Any]:
        return self.model.as_dict()


def new_target(prepared: PreparedModel, settings: ModelSettings) -> NewTarget:
    """The target for ``prepared``, exactly as the agent's schema wants it, or InvalidValue."""
    for param, check, value in (
        ("name", check_name, settings.name),
        ("version", check_version, settings.version),
    ):
        try:
            check(value)
        except TargetRefused as exc:
            raise InvalidValue(param, str(exc)) from exc
    path = target_path(settings.name, settings.version, prepared.filename)
    min_ram = settings.min_ram_bytes
    if min_ram is None:
        min_ram = int(prepared.model_bytes * RAM_FACTOR)
    custom = {
        "edgelm": {
            "name": settings.name,
            "version": settings.version,
            "format": prepared.format,
            "backend": BACKEND_FOR_FORMAT[prepared.format],
            "context_length": settings.context_length,
            "chat_template": settings.chat_template,
            "quantization": settings.quantization,
            "min_ram_bytes": min_ram,
            "sampling": {},
            "health_check": {},
        }
    }
    if settings.role != GENERATION:  # absent means generation: older targets sign the same
        custom["edgelm"]["role"] = settings.role
    if settings.presets:
        try:
            presets = parse_presets(
                settings.presets, "--presets", context_length=settings.context_length
            )
        except TargetRefused as exc:
            raise InvalidValue("presets", str(exc)) from exc
        # The canonical form: what every device parses back, byte for byte.
        custom["edgelm"]["presets"] = presets_custom(presets)
    hashes = {"sha256": prepared.sha256}
    try:
        model = parse_model_target(path, prepared.length, hashes, custom)
    except TargetRefused as exc:
        raise InvalidValue("model", f"the agent would refuse this target: {exc}") from exc
    info = TargetFile(prepared.length, hashes, path, unrecognized_fields={"custom": custom})
    return NewTarget(path, info, model)


def already_published(current: Targets, target: NewTarget) -> bool:
    """True if ``target`` is listed exactly; raise if its name@version holds anything else."""
    directory = target.path.rsplit("/", 1)[0] + "/"
    same_version = {p: t for p, t in current.targets.items() if p.startswith(directory)}
    if not same_version:
        return False
    if same_version == {target.path: target.info}:
        return True
    ref = target.model.ref
    raise AlreadyIssued(
        "model",
        ref,
        f"{ref} is published already with other content or settings",
        hint="a published version never changes; push this one under a new --version",
    )


def check_targets_key(root: Root, signer: Signer, key_path: Path) -> None:
    """Refuse a targets key the fleet's root does not list (another fleet's, or a stale one)."""
    keyid = signer.public_key.keyid
    if keyid not in root.roles[Targets.type].keyids:
        raise FleetDirError(
            "wrong-targets-key",
            key_path,
            f"{key_path} is not a targets key of this fleet's root (keyid {keyid[:16]}...)",
            hint="--fleet-dir must be the directory fleet-init made for this fleet",
        )


def next_targets(
    current: Metadata[Targets],
    target: NewTarget,
    signer: Signer,
    *,
    now: datetime.datetime,
) -> Metadata[Targets]:
    """A copy of ``current`` with ``target`` added, version + 1, new expiry, signed."""
    following = Metadata[Targets].from_bytes(current.to_bytes(SERIALIZER))
    signed = following.signed
    signed.version = current.signed.version + 1
    signed.expires = (now + TARGETS_EXPIRY).replace(microsecond=0)
    signed.targets[target.path] = target.info
    following.signatures.clear()
    following.sign(signer)
    return following


def verify_against_root(root: Root, targets: Metadata[Targets]) -> None:
    """The check the control plane and every device will make: signed by root's targets keys
    up to the threshold. A failure here is a bug or a wrong key, never worth uploading."""
    try:
        root.verify_delegate(Targets.type, targets.signed_bytes, targets.signatures)
    except UnsignedMetadataError as exc:
        raise InvalidValue("targets", f"the new targets metadata does not verify: {exc}") from exc
