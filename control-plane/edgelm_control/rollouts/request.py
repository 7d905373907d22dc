"""A rollout as the operator asks for it (``POST /api/v1/rollouts``), checked. Pure.

::

    {"model": "smollm2@1.0", "selector": {"labels": {"site": "berlin"}},
     "canary": "10%" | 5,  or  "waves": "1,10,rest",
     "success_threshold": 1.0, "failure_threshold": 0.2, "on_failure": "pause",
     "health_margin": 0.2 | null, "device_timeout_s": 1800, "pending_expiry_s": 604800,
     "pause_between_waves": false}

Only ``model`` and ``selector`` are required. Without ``canary`` or ``waves`` the rollout
starts with a canary of 10% (at least one device), then the rest: a model reaches the whole
fleet only after some devices have run it. ``canary`` and ``waves`` together are refused
(they would contradict each other). Unknown keys are refused, so a typo is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edgelm_control.errors import InvalidRequest
from edgelm_control.rollouts.selection import Selector, selector_from_json
from edgelm_control.rollouts.settings import RolloutSettings
from edgelm_control.rollouts.waves import WaveSpec, parse_canary, parse_waves
from edgelm_protocol import InvalidId
from edgelm_protocol.ids import check_model_key

DEFAULT_CANARY = "10%"
SETTING_KEYS = (
    "success_threshold",
    "failure_threshold",
    "on_failure",
    "health_margin",
    "device_timeout_s",
    "pending_expiry_s",
    "pause_between_waves",
)
KEYS = ("model", "selector", "canary", "waves", *SETTING_KEYS)


@dataclass(frozen=True)
class RolloutRequest:
    model: str
    selector: Selector
    waves: WaveSpec
    settings: RolloutSettings


def parse_rollout_request(
    body: object, *, device_timeout_s: int, pending_expiry_s: int
) -> RolloutRequest:
    """Check a request body; the defaults for the two clocks come from the configuration."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("the body must be a JSON object", param="body")
    unknown = sorted(set(body) - set(KEYS))
    if unknown:
        raise InvalidRequest(
            f"unknown field {unknown[0]!r}; a rollout takes {', '.join(KEYS)}", param=unknown[0]
        )
    for required in ("model", "selector"):
        if required not in body:
            raise InvalidRequest(f"{required} is required", param=required)
    try:
        model = check_model_key(body["model"])
    except InvalidId as exc:
        raise InvalidRequest(str(exc), param="model") from None
    selector = selector_from_json(body["selector"])
    if "canary" in body and "waves" in body:
        raise InvalidRequest("give canary or waves, not both", param="waves")
    if "waves" in body:
        if not isinstance(body["waves"], str):
            raise InvalidRequest(
                f"waves must be a string like '1,10,rest', got {body['waves']!r}", param="waves"
            )
        waves = parse_waves(body["waves"])
    else:
        canary = body.get("canary", DEFAULT_CANARY)
        if isinstance(canary, bool) or not isinstance(canary, str | int):
            raise InvalidRequest(
                f"canary must be a count like 5 or a share like '10%', got {canary!r}",
                param="canary",
            )
        waves = parse_canary(str(canary))
    values: dict[str, object] = {
        "device_timeout_s": device_timeout_s,
        "pending_expiry_s": pending_expiry_s,
    }
    values.update({key: body[key] for key in SETTING_KEYS if key in body})
    settings = RolloutSettings.from_mapping(values)
    return RolloutRequest(model=model, selector=selector, waves=waves, settings=settings)
