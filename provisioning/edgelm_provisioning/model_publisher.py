"""``models push``, step by step: verify, hash, sign offline, upload, confirm.

1. :meth:`ModelPublisher.verify`: fetch the control plane's metadata and verify it against the
   fleet's root (:mod:`~edgelm_provisioning.repository_check`); check that ``DIR/keys``'
   targets key is the one that root trusts. A server that fails here gets nothing signed.
2. :func:`~edgelm_provisioning.model_source.prepare_model` (the caller): hash the model.
3. :meth:`ModelPublisher.sign`: the next targets version, with the new target, signed with
   the offline targets key and verified against the root as every device will verify it
   (:mod:`~edgelm_provisioning.targets_signing`).
4. :meth:`ModelPublisher.upload`: ``POST /api/v1/models``, the signed metadata and the blobs.
5. :meth:`ModelPublisher.confirm`: read the repository again, as a device would, and check it
   now lists the target exactly. This also records the new versions in
   ``DIR/trusted-metadata/``, so a later rollback by the server below them is caught.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import FetcherInterface

from edgelm_protocol.repository.writer import load_key
from edgelm_provisioning.control_client import ControlClient
from edgelm_provisioning.errors import ControlProtocolError
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_keys import held_keys
from edgelm_provisioning.model_source import PreparedModel
from edgelm_provisioning.repository_check import (
    VerifiedRepository,
    metadata_url,
    verify_repository,
)
from edgelm_provisioning.targets_signing import (
    SERIALIZER,
    ModelSettings,
    NewTarget,
    already_published,
    check_targets_key,
    new_target,
    next_targets,
    verify_against_root,
)


@dataclass(frozen=True)
class PushPlan:
    """What a push will upload. ``metadata`` is None when the target is published already."""

    target: NewTarget
    prepared: PreparedModel
    current_version: int
    metadata: Metadata[Targets] | None

    @property
    def new_version(self) -> int | None:
        return None if self.metadata is None else self.metadata.signed.version

    def metadata_bytes(self) -> bytes:
        assert self.metadata is not None
        return self.metadata.to_bytes(SERIALIZER)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.as_dict(),
            "already_published": self.metadata is None,
            "targets_version": self.new_version or self.current_version,
            "blobs": [{"sha256": b.sha256, "length": b.length} for b in self.prepared.blobs],
        }


class ModelPublisher:
    def __init__(
        self, fleet: FleetDir, control_url: str, *, fetcher: FetcherInterface | None = None
    ) -> None:
        self.fleet = fleet
        self.control_url = control_url
        self._fetcher = fetcher
        # After a targets-key rotation DIR/keys holds targets-0.pem, targets-1.pem ...: the
        # one to sign with is the one the verified root lists (see verify).
        self._keys = held_keys(fleet.paths.keys_dir, Targets.type)
        if not self._keys:
            fleet.require(fleet.paths.targets_key, "the offline targets key")  # raises
            self._keys = [(fleet.paths.targets_key, load_key(fleet.paths.targets_key))]
        self._key_path, self._signer = self._keys[-1]

    def verify(self) -> VerifiedRepository:
        verified = verify_repository(self.fleet.paths, self.control_url, fetcher=self._fetcher)
        listed = verified.root.signed.roles[Targets.type].keyids
        self._key_path, self._signer = next(
            ((p, s) for p, s in reversed(self._keys) if s.public_key.keyid in listed),
            self._keys[-1],
        )
        check_targets_key(verified.root.signed, self._signer, self._key_path)
        return verified

    def sign(
        self,
        verified: VerifiedRepository,
        prepared: PreparedModel,
        settings: ModelSettings,
        *,
        now: datetime.datetime,
    ) -> PushPlan:
        target = new_target(prepared, settings)
        current = verified.targets
        if already_published(current.signed, target):
            return PushPlan(target, prepared, current.signed.version, None)
        following = next_targets(current, target, self._signer, now=now)
        verify_against_root(verified.root.signed, following)
        return PushPlan(target, prepared, current.signed.version, following)

    async def upload(
        self, client: ControlClient, plan: PushPlan, on_bytes: Callable[[int], None]
    ) -> Any:
        return await client.upload_model(plan.metadata_bytes(), plan.prepared.blobs, on_bytes)

    def confirm(self, plan: PushPlan) -> VerifiedRepository:
        """The repository as devices now see it must list the pushed target exactly."""
        verified = verify_repository(self.fleet.paths, self.control_url, fetcher=self._fetcher)
        listed = verified.targets.signed.targets.get(plan.target.path)
        if listed != plan.target.info:
            raise ControlProtocolError(
                f"the control plane accepted {plan.target.model.ref} but its repository does "
                f"not list it (targets v{verified.targets.signed.version})",
                url=metadata_url(self.control_url),
                hint="devices cannot install it yet; see the control plane's log, then push "
                "again (a push of a target already listed does nothing)",
            )
        return verified
