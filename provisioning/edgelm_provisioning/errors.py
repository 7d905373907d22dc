"""Errors raised by provisioning and the operator's CLI, grouped by who is at fault.

::

    ProvisioningError              root: catch this to catch everything the package raises
    ├── OperatorError              what the operator asked for is invalid or cannot be done
    │   ├── InvalidValue               an id, label, URL, token name or option is malformed
    │   ├── FleetDirError              the fleet directory is missing, incomplete or taken
    │   ├── AlreadyIssued              a device id, token name or model version exists already
    │   ├── NotIssued                  a device id or token name that was never issued
    │   ├── InvalidModelSource         not a GGUF file, not an ONNX GenAI folder, unsafe member
    │   ├── RefusedRequest             a certificate signing request (CSR) the CA will not sign
    │   └── MissingSetting             no control-plane URL or token was given anywhere
    ├── UntrustedRepository        the control plane's TUF metadata failed verification: the
    │   │                          server is broken or attacked, and nothing was signed over it
    │   ├── RepositorySignatureError   a signature does not verify against the fleet's root
    │   ├── RepositoryRollback         a version is older than one this machine already saw
    │   ├── RepositoryExpired          metadata past its expiry
    │   └── RepositoryInvalid          anything else python-tuf refused
    └── ControlPlaneError          talking to the control plane failed
        ├── ControlUnreachable         no connection, or no answer in time (transport)
        ├── ControlRequestFailed       the server answered with an error body (4xx/5xx)
        └── ControlProtocolError       the answer is not what the REST API promises

Every class has a ``reference``: the stable id the CLI shows and scripts match on (kebab-case
for ours; for :class:`ControlRequestFailed` the server's own error ``code``, verbatim). Errors
carry the attributes a caller needs (``path``, ``status_code``, ``param`` ...) and an optional
``hint`` that says what to do about it. The CLI turns them into ``DiagnosticError`` in one
place (:func:`edgelm_provisioning.operator_cli.diagnostic`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar


class ProvisioningError(Exception):
    """Root of every error the package raises on purpose."""

    reference: str = "provisioning-error"
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint


# --- the operator's input ----------------------------------------------------------------------


class OperatorError(ProvisioningError):
    """The operator asked for something invalid or impossible; nothing was changed."""

    reference = "invalid-request"


class InvalidValue(OperatorError):
    """A value typed or passed in is malformed. ``param`` names the option or field."""

    reference = "invalid-value"

    def __init__(self, param: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.param = param
        if param.replace("_", "").isalnum():  # an option or field; not a path
            self.reference = f"invalid-{param.replace('_', '-')}"


class FleetDirError(OperatorError):
    """The fleet directory cannot be used as asked. ``path`` is the directory."""

    reference = "fleet-dir"

    def __init__(
        self, reference: str, path: Path, message: str, *, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.reference = reference
        self.path = path


class AlreadyIssued(OperatorError):
    """``name`` (a device id, token name or ``model@version``) exists already."""

    reference = "already-issued"

    def __init__(self, kind: str, name: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reference = f"{kind}-exists"
        self.kind = kind
        self.name = name


class NotIssued(OperatorError):
    """``name`` (a device id or token name) was never issued."""

    reference = "not-issued"

    def __init__(self, kind: str, name: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reference = f"unknown-{kind}"
        self.kind = kind
        self.name = name


class InvalidModelSource(OperatorError):
    """The model to push is not a GGUF file nor an ONNX GenAI folder of regular files."""

    reference = "invalid-model"

    def __init__(self, path: Path, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class RefusedRequest(OperatorError):
    """A certificate signing request the fleet CA will not sign. ``reason`` is the stable
    part of the reference (``csr-<reason>``): ``malformed``, ``bad-signature``, ``wrong-cn``,
    ``weak-key``, ``weak-hash`` or ``ca-requested``."""

    reference = "csr-refused"

    def __init__(self, reason: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reference = f"csr-{reason}"
        self.reason = reason


class MissingSetting(OperatorError):
    """A setting the command needs (``setting``: ``control_url`` or ``token``) is unset."""

    reference = "missing-setting"

    def __init__(self, setting: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reference = f"no-{setting.replace('_', '-')}"
        self.setting = setting


# --- the control plane's repository ------------------------------------------------------------


class UntrustedRepository(ProvisioningError):
    """The repository's metadata failed verification against the fleet's root.

    ``role`` is the TUF role at fault when known. Raised before anything is signed: a server
    that serves bad metadata must never get the operator's signature over it.
    """

    reference = "repository-untrusted"
    hint = (
        "the control plane (or something between it and you) serves metadata that the fleet's "
        "root does not vouch for; nothing was signed or uploaded"
    )

    def __init__(self, message: str, *, role: str | None = None) -> None:
        super().__init__(message)
        self.role = role


class RepositorySignatureError(UntrustedRepository):
    reference = "repository-bad-signature"


class RepositoryRollback(UntrustedRepository):
    reference = "repository-rollback"


class RepositoryExpired(UntrustedRepository):
    reference = "repository-expired"
    hint = (
        "the control plane re-signs timestamp and snapshot itself: is it running? Expired "
        "targets or root metadata must be re-signed with the offline keys"
    )


class RepositoryInvalid(UntrustedRepository):
    reference = "repository-invalid"


# --- talking to the control plane --------------------------------------------------------------


class ControlPlaneError(ProvisioningError):
    """A call to the control plane failed. ``url`` is what was called."""

    reference = "control-error"

    def __init__(self, message: str, *, url: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.url = url


class ControlUnreachable(ControlPlaneError):
    """No connection, a connection cut, or no answer within the timeout."""

    reference = "control-unreachable"
    hint = (
        "is it running (`edgelm control run --config DIR/control/control.toml`)? "
        "pass --control URL or set EDGELM_CONTROL_URL"
    )


class ControlRequestFailed(ControlPlaneError):
    """The server answered with an error. ``reference`` is its error ``code``."""

    #: Hints by status, for the errors an operator can fix from the command line.
    HINTS: ClassVar[dict[int, str]] = {
        401: "check --token, EDGELM_CONTROL_TOKEN or DIR/operator-token; the server's "
        "tokens.json must list the token's sha256 (edgelm provision token create)",
        403: "this token may not do that",
        404: "check the id (list them with the matching `list` command)",
        409: "the request does not fit the current state; look at it with `show`",
    }

    def __init__(
        self,
        *,
        url: str,
        method: str,
        status_code: int,
        code: str | None,
        message: str,
        param: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message, url=url, hint=self.HINTS.get(status_code))
        self.reference = code or f"http-{status_code}"
        self.method = method
        self.status_code = status_code
        self.code = code
        self.param = param
        self.error_type = error_type


class ControlProtocolError(ControlPlaneError):
    """The server answered, but not in the shape the REST API promises."""

    reference = "control-bad-answer"
