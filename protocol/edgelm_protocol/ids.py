"""The identifiers of the contract: fleets, devices, messages, rollouts and model names.

Fleet and device ids become MQTT topic levels, broker client ids and ACL patterns, so their
alphabet is closed (``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``, matched in full) rather than "anything
but the bad characters". That one pattern refuses everything that would let an id escape its
place:

* ``+`` and ``#`` are MQTT wildcards: a device named ``+`` would subscribe to every device;
* ``/`` adds a topic level: ``kiosk/../x`` or ``a/dev/b`` would point at another device's topic;
* ``$`` starts broker-internal topics (``$SYS``, ``$share``);
* NUL, whitespace and control characters break topics, logs, file names and ACL files;
* a leading ``.``, ``-`` or ``_`` keeps ids away from hidden files and command-line options.

``control`` is reserved: it is the ``from`` of every control-plane message, and a device called
``control`` would make its own messages indistinguishable from the control plane's in logs and
could collide with the control plane's broker client id.

Model names and versions use the same patterns as the agent's registry
(``edgelm_agent.registry.model_target``) because they name TUF target paths
(``models/{name}/{version}/{file}``); the protocol cannot import the agent, so the patterns are
restated here and must stay equal.
"""

from __future__ import annotations

import re
import uuid

from edgelm_protocol.errors import InvalidId

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MESSAGE_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
MODEL_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MODEL_VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")

CONTROL_SENDER = "control"
"""The ``from`` of every message the control plane sends; never a device id."""

_ID_RULE = "1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit"


def _check(kind: str, value: object, pattern: re.Pattern[str], expected: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise InvalidId(kind, value, expected)
    return value


def check_fleet_id(value: object) -> str:
    """Return ``value`` if it is a valid fleet id, else raise :class:`InvalidId`."""
    return _check("fleet_id", value, ID_PATTERN, _ID_RULE)


def check_device_id(value: object) -> str:
    """Return ``value`` if it is a valid device id (and not the reserved ``control``)."""
    if value == CONTROL_SENDER:
        raise InvalidId("device_id", value, f"{_ID_RULE}, other than the reserved 'control'")
    return _check("device_id", value, ID_PATTERN, _ID_RULE)


def check_sender(value: object) -> str:
    """Return ``value`` if it may stand in an envelope's ``from``: a device id or ``control``."""
    if value == CONTROL_SENDER:
        return CONTROL_SENDER
    return _check("sender", value, ID_PATTERN, f"'control' or a device id ({_ID_RULE})")


def check_message_id(value: object) -> str:
    """Return ``value`` if it is a message id: 32 lower-case hex characters (``uuid4().hex``)."""
    return _check("message_id", value, MESSAGE_ID_PATTERN, "32 lower-case hex characters")


LOCAL_JOB_ID_PATTERN = re.compile(r"job-[0-9a-f]{24}")


def check_job_id(value: object) -> str:
    """Return ``value`` if it names a job in a result: the message id of a fleet job, or a
    device's own job id (``job-`` and 24 hex characters) for a job a local app sent upstream."""
    if isinstance(value, str) and LOCAL_JOB_ID_PATTERN.fullmatch(value):
        return value
    return _check(
        "job_id", value, MESSAGE_ID_PATTERN, "a message id, or job- and 24 hex characters"
    )


def check_rollout_id(value: object) -> str:
    """Return ``value`` if it is a valid rollout id (the id alphabet: it is logged and queried)."""
    return _check("rollout_id", value, ID_PATTERN, _ID_RULE)


def check_share_group(value: object) -> str:
    """Return ``value`` if it may name an MQTT shared-subscription group.

    MQTT 5 only forbids ``/``, ``+`` and ``#`` in a share name; the id alphabet is stricter and
    keeps group names readable in broker dashboards.
    """
    return _check("share_group", value, ID_PATTERN, _ID_RULE)


def check_model_name(value: object) -> str:
    """Return ``value`` if it is a model name as the registry accepts it."""
    if isinstance(value, str) and ".." in value:
        raise InvalidId("model_name", value, "a name without '..'")
    return _check(
        "model_name", value, MODEL_NAME_PATTERN, "1-64 of a-z 0-9 . _ - starting with a-z or 0-9"
    )


def check_model_version(value: object) -> str:
    """Return ``value`` if it is a model version as the registry accepts it."""
    if isinstance(value, str) and ".." in value:
        raise InvalidId("model_version", value, "a version without '..'")
    return _check(
        "model_version",
        value,
        MODEL_VERSION_PATTERN,
        "1-64 of A-Z a-z 0-9 . _ + - starting with a letter or digit",
    )


def check_model_key(value: object) -> str:
    """Return ``value`` if it is ``name@version``, the way events and telemetry name a model."""
    if not isinstance(value, str) or value.count("@") != 1:
        raise InvalidId("model", value, "'name@version'")
    name, version = value.split("@")
    check_model_name(name)
    check_model_version(version)
    return value


def new_message_id() -> str:
    """A fresh message id. The one source of randomness in the package; inject it in tests."""
    return uuid.uuid4().hex
