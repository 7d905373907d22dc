"""Why a pushed model is refused, grouped by who is at fault (the operator, always).

::

    RequestError
    └── PushRefused                400  a pushed model is not accepted; nothing is published
        ├── MalformedTargets           400  not TUF targets metadata, or a bad multipart body
        ├── InvalidTarget              400  a target breaks the edgelm target schema
        ├── MissingBlob                400  a new target's blob was not uploaded
        ├── UnexpectedBlob             400  an uploaded blob that no new target needs
        ├── ForgedTargets              422  the signatures do not meet root's targets threshold
        ├── ExpiredTargets             422  the metadata has already expired
        ├── BlobMismatch               422  a blob's length or sha256 differs from the target's
        ├── WrongTargetsVersion        409  the version is not the current one + 1
        └── ImmutableTarget            409  a published target would change under its path

Every class carries the facts as attributes (``expected``, ``actual``, ``path``, ...).
"""

from __future__ import annotations

from edgelm_control.errors import RequestError


class PushRefused(RequestError):
    """A pushed model is not accepted; the repository is unchanged."""

    status_code = 400
    code = "push_refused"


class MalformedTargets(PushRefused):
    status_code = 400
    code = "malformed_targets"


class InvalidTarget(PushRefused):
    status_code = 400
    code = "invalid_target"

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message, param="targets")
        self.path = path


class MissingBlob(PushRefused):
    status_code = 400
    code = "missing_blob"

    def __init__(self, *, path: str, sha256: str) -> None:
        super().__init__(
            f"target {path} needs the blob with sha256 {sha256}, and no part carried it",
            param=sha256,
        )
        self.path = path
        self.sha256 = sha256


class UnexpectedBlob(PushRefused):
    status_code = 400
    code = "unexpected_blob"

    def __init__(self, *, sha256: str) -> None:
        super().__init__(
            f"no new target needs the uploaded blob with sha256 {sha256}", param=sha256
        )
        self.sha256 = sha256


class ForgedTargets(PushRefused):
    status_code = 422
    code = "forged_targets"

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the targets metadata is not signed by root's targets keys: {reason}",
            param="targets",
        )
        self.reason = reason


class ExpiredTargets(PushRefused):
    status_code = 422
    code = "expired_targets"

    def __init__(self, expires: str) -> None:
        super().__init__(f"the targets metadata expired at {expires}", param="targets")
        self.expires = expires


class BlobMismatch(PushRefused):
    status_code = 422
    code = "blob_mismatch"

    def __init__(self, *, part: str, expected: str, actual: str) -> None:
        super().__init__(f"blob {part} must be {expected}, got {actual}", param=part)
        self.part = part
        self.expected = expected
        self.actual = actual


class WrongTargetsVersion(PushRefused):
    status_code = 409
    code = "wrong_targets_version"

    def __init__(self, *, expected: int, actual: int) -> None:
        super().__init__(
            f"targets version must be {expected} (the current one + 1), got {actual}",
            param="targets",
        )
        self.expected = expected
        self.actual = actual


class ImmutableTarget(PushRefused):
    status_code = 409
    code = "immutable_target"

    def __init__(self, *, path: str) -> None:
        super().__init__(
            f"target {path} is published already with other contents; a model version "
            "never changes: push a new version",
            param="targets",
        )
        self.path = path
