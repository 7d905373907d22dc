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

    RequestError
    └── RootRefused                400  a pushed root (a key rotation) is refused; nothing changes
        ├── MalformedRoot              400  not TUF root metadata
        ├── InvalidRoot                400  consistent snapshots off, or bad director keys
        ├── ForgedRoot                 422  the old root's or its own threshold is not met
        ├── ExpiredRoot                422  the root has already expired
        ├── WrongRootVersion           409  the version is not the current one + 1
        ├── MissingOnlineKey           409  it lists online keys this server does not hold
        └── TargetsNotResigned         409  its targets keys did not sign the published
                                            targets, and no re-signed targets came with it

Re-signed targets pushed with a root go through the model push's checks (the first tree),
against the new root.

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


# --- key rotation: a new root -------------------------------------------------------------------


class RootRefused(RequestError):
    """A pushed root is not accepted; the repository and the director are unchanged."""

    status_code = 400
    code = "root_refused"


class MalformedRoot(RootRefused):
    status_code = 400
    code = "malformed_root"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="root")


class InvalidRoot(RootRefused):
    status_code = 400
    code = "invalid_root"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="root")


class ForgedRoot(RootRefused):
    status_code = 422
    code = "forged_root"

    def __init__(self, *, by: str, reason: str) -> None:
        super().__init__(f"the new root is not signed by {by}: {reason}", param="root")
        self.by = by
        self.reason = reason


class ExpiredRoot(RootRefused):
    status_code = 422
    code = "expired_root"

    def __init__(self, expires: str) -> None:
        super().__init__(f"the new root expired at {expires}", param="root")
        self.expires = expires


class WrongRootVersion(RootRefused):
    status_code = 409
    code = "wrong_root_version"

    def __init__(self, *, expected: int, actual: int) -> None:
        super().__init__(
            f"root version must be {expected} (the current one + 1), got {actual}; roots are "
            "published one version at a time, in order",
            param="root",
        )
        self.expected = expected
        self.actual = actual


class MissingOnlineKey(RootRefused):
    status_code = 409
    code = "missing_online_key"

    def __init__(self, *, role: str, needed: int, held: int, hint: str) -> None:
        super().__init__(
            f"the new root needs {needed} {role} key(s) this control plane holds, and it "
            f"holds {held} of those it lists; {hint}",
            param="root",
        )
        self.role = role
        self.needed = needed
        self.held = held


class TargetsNotResigned(RootRefused):
    status_code = 409
    code = "targets_not_resigned"

    def __init__(self, *, targets_version: int) -> None:
        super().__init__(
            f"the new root's targets keys did not sign the published targets "
            f"v{targets_version}; push targets v{targets_version + 1}, re-signed with the new "
            "targets key, with it (edgelm fleet keys publish does)",
            param="targets",
        )
        self.targets_version = targets_version
