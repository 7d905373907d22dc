"""The operator's side of a fleet, for tests: keys, the repository, tokens, signed pushes.

This builds the layout ``edgelm provision fleet-init`` writes (docs/fleet.md, "The fleet
directory") with the same library calls, so the control plane under test reads what
provisioning writes::

    DIR/keys/root-0.pem, targets-0.pem          offline: signs root and models
    DIR/control/control.toml, tokens.json
    DIR/control/repository/                     the TUF repository
    DIR/control/keys/snapshot-0.pem, timestamp-0.pem, director.pem
"""

from __future__ import annotations

import datetime
import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Snapshot, TargetFile, Targets, Timestamp

from edgelm_control.config import ControlConfig, resolve_config
from edgelm_protocol import DirectorKeys
from edgelm_protocol.bundle import BundleFile, build_manifest
from edgelm_protocol.repository import RepositoryWriter, generate_key, load_key


def gguf_custom(name: str, version: str) -> dict[str, Any]:
    return {
        "edgelm": {
            "name": name,
            "version": version,
            "format": "gguf",
            "backend": "llama.cpp",
            "context_length": 2048,
            "chat_template": None,
            "quantization": "Q4_1",
            "min_ram_bytes": 1 << 20,
            "sampling": {},
            "health_check": {},
        }
    }


def onnx_custom(name: str, version: str) -> dict[str, Any]:
    custom = gguf_custom(name, version)
    custom["edgelm"] |= {"format": "onnx", "backend": "onnxruntime-genai", "quantization": "int4"}
    return custom


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Push:
    """What ``edgelm fleet models push`` uploads: signed targets and blobs by sha256."""

    targets: bytes
    blobs: dict[str, bytes]
    paths: list[str]


@dataclass
class Fleet:
    root: Path
    name: str
    token: str

    @property
    def control_dir(self) -> Path:
        return self.root / "control"

    @property
    def repository_dir(self) -> Path:
        return self.control_dir / "repository"

    @property
    def offline_keys(self) -> Path:
        return self.root / "keys"

    def director_keys(self) -> DirectorKeys:
        private = serialization.load_pem_private_key(
            (self.control_dir / "keys" / "director.pem").read_bytes(), password=None
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return DirectorKeys.from_pem([public])

    def config(self, **overrides: Any) -> ControlConfig:
        """The control plane's configuration, as ``control.toml`` plus test overrides."""
        toml = {
            "fleet": self.name,
            "http": "127.0.0.1:0",
            "db": "sqlite:///control.db",
            "broker_url": "mqtt://127.0.0.1:1883",
            "repository_dir": "repository",
            "keys_dir": "keys",
            "tokens_file": "tokens.json",
            "engine_tick_s": 0.1,
            "ingest_flush_interval_s": 0.01,
            "ingest_decode_workers": 0,  # one test turns the worker on; the rest save a process
            "shutdown_grace_s": 10,
            "log_format": "console",
        } | overrides
        return resolve_config(toml_data=toml, toml_dir=self.control_dir, cwd=self.control_dir)

    def current_targets(self) -> Metadata[Targets]:
        metadata = self.repository_dir / "metadata"
        timestamp = Metadata[Timestamp].from_file(str(metadata / "timestamp.json"))
        version = timestamp.signed.snapshot_meta.version
        snapshot = Metadata[Snapshot].from_file(str(metadata / f"{version}.snapshot.json"))
        targets_version = snapshot.signed.meta["targets.json"].version
        return Metadata[Targets].from_file(str(metadata / f"{targets_version}.targets.json"))

    def timestamp_version(self) -> int:
        path = self.repository_dir / "metadata" / "timestamp.json"
        return int(Metadata[Timestamp].from_file(str(path)).signed.version)

    def sign_push(
        self,
        files: dict[str, tuple[bytes, dict[str, Any]]],
        *,
        version: int | None = None,
        signer: CryptoSigner | None = None,
        extra_blobs: dict[str, bytes] | None = None,
    ) -> Push:
        """New targets metadata adding ``files`` (path -> (bytes, custom)), signed with the
        operator's targets key (or ``signer``), and the blobs to upload."""
        current = self.current_targets()
        new = Metadata[Targets].from_bytes(current.to_bytes())
        new.signed.version = current.signed.version + 1 if version is None else version
        new.signed.expires = datetime.datetime.now(datetime.UTC).replace(
            microsecond=0
        ) + datetime.timedelta(days=30)
        blobs: dict[str, bytes] = {}
        for path, (data, custom) in files.items():
            new.signed.targets[path] = TargetFile(
                length=len(data),
                hashes={"sha256": sha256(data)},
                path=path,
                unrecognized_fields={"custom": custom},
            )
            blobs[sha256(data)] = data
        blobs |= extra_blobs or {}
        new.signatures.clear()
        new.sign(signer or load_key(self.offline_keys / "targets-0.pem"))
        return Push(targets=new.to_bytes(), blobs=blobs, paths=list(files))

    def gguf_push(self, name: str, version: str, data: bytes | None = None) -> Push:
        blob = data if data is not None else f"GGUF {name} {version} ".encode() * 64
        return self.sign_push(
            {f"models/{name}/{version}/model.gguf": (blob, gguf_custom(name, version))}
        )

    def onnx_push(self, name: str, version: str, members: dict[str, bytes]) -> Push:
        manifest = build_manifest(
            [BundleFile(path, len(data), sha256(data)) for path, data in members.items()]
        )
        push = self.sign_push(
            {f"models/{name}/{version}/bundle.json": (manifest, onnx_custom(name, version))}
        )
        push.blobs |= {sha256(data): data for data in members.values()}
        return push


def make_fleet(root: Path, name: str = "acme") -> Fleet:
    """A new fleet directory, as ``edgelm provision fleet-init`` lays it out."""
    control = root / "control"
    RepositoryWriter.create(
        control / "repository",
        root / "keys",
        key_dirs={
            "root": root / "keys",
            "targets": root / "keys",
            "snapshot": control / "keys",
            "timestamp": control / "keys",
        },
    )
    generate_key(control / "keys" / "director.pem")
    token = secrets.token_urlsafe(24)
    (control / "tokens.json").write_text(
        json.dumps(
            {"tokens": [{"name": "operator", "sha256": sha256(token.encode()), "created_at": 0}]}
        )
    )
    (root / "operator-token").write_text(token)
    return Fleet(root=root, name=name, token=token)


def forged_signer(tmp: Path) -> CryptoSigner:
    """A key root does not trust for targets."""
    return generate_key(tmp / "attacker-0.pem")
