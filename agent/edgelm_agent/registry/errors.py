"""Errors of the model registry, split like python-tuf's by who is at fault.

::

    RegistryError (EdgelmError)
    ├── RepositoryError          the signed data or the model bytes are bad: never install
    │   ├── VerificationError        bad or missing signatures, wrong keys, below threshold
    │   ├── ExpiredMetadata          metadata past its expiry (by the last-known-good clock)
    │   ├── RollbackAttack           a version older than one already trusted
    │   ├── TargetMismatch           a blob whose length or hash differs from the signed one
    │   ├── UnsafeTargetPath         a target name that could escape the store
    │   ├── InvalidModelMetadata     a target without the custom fields the agent needs
    │   └── MetadataTooLarge         metadata over its size limit (endless-data attack)
    ├── DownloadError            the transport failed on every mirror
    │   └── DownloadRefused          ... and every mirror refused for good (HTTP 4xx)
    ├── Cancelled                work stopped part-way: its caller went away, or the agent stops
    │   └── InstallCancelled         a download was cancelled (a newer desired state); resumable
    ├── InsufficientSpace        not enough free disk for the model plus the margin
    ├── ModelNotInstalled        the caller named a model this device does not have
    ├── UnsafeSource             an import names a link, a special file, or such inside a folder
    ├── VersionConflict          an import would change a version that already exists
    ├── RegistryBusy             another process (a running agent) holds the registry
    └── ActivationFailed         the model failed to load or its health check; rolled back

``transient`` marks the failures worth trying again unchanged (the network, a repository whose
metadata is being re-signed, a registry another process holds): fleet sync retries those with
backoff while the desired state stands, and reports the others as final.

The python-tuf exceptions are translated at the boundary (``raise ... from exc``), so callers
match on these classes and their attributes, never on strings.
"""

from __future__ import annotations

from edgelm_agent.errors import EdgelmError


class RegistryError(EdgelmError):
    code = "registry_error"
    transient = False  # see the module docstring


class RepositoryError(RegistryError):
    """Data from the repository (or the blob on disk) failed verification."""

    code = "verification_failed"


class VerificationError(RepositoryError):
    code = "bad_signature"


class ExpiredMetadata(RepositoryError):
    code = "metadata_expired"
    transient = True  # the repository re-signs its timestamp; a freeze stays refused


class RollbackAttack(RepositoryError):
    code = "rollback_detected"


class TargetMismatch(RepositoryError):
    code = "target_mismatch"


class UnsafeTargetPath(RepositoryError):
    code = "unsafe_target_path"


class InvalidModelMetadata(RepositoryError):
    code = "invalid_model_metadata"


class MetadataTooLarge(RepositoryError):
    code = "metadata_too_large"


class DownloadError(RegistryError):
    code = "download_failed"
    transient = True


class DownloadRefused(DownloadError):
    """Every mirror refused for good (an HTTP 4xx other than 408 and 429): trying the same
    again will not help."""

    code = "download_refused"
    transient = False


class Cancelled(RegistryError):
    """An import, a hash or a download stopped at a chunk boundary because it was asked to;
    nothing of it was kept but a resumable partial download."""

    code = "cancelled"


class InstallCancelled(Cancelled):
    code = "install_cancelled"


class InsufficientSpace(RegistryError):
    code = "insufficient_space"

    def __init__(self, *, needed_bytes: int, available_bytes: int, path: str) -> None:
        super().__init__(
            f"not enough disk space in {path}: need {needed_bytes} bytes (model plus margin), "
            f"{available_bytes} available"
        )
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


class ModelNotInstalled(RegistryError):
    code = "model_not_installed"


class UnsafeSource(RegistryError):
    """What an import names cannot be read safely (see registry/import_source.py)."""

    code = "unsafe_source"


class VersionConflict(RegistryError):
    """Versions never change: the same name@version with other content is refused."""

    code = "version_conflict"


class RegistryBusy(RegistryError):
    code = "registry_busy"
    transient = True


class ActivationFailed(RegistryError):
    code = "activation_failed"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
