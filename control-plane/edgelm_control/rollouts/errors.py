"""Errors of the rollout core, grouped by who is at fault.

::

    ControlError
    ├── IllegalTransition              a device report or engine step its row's state does not
    │                                  take (a late or out-of-order report, or an engine bug);
    │                                  the shell logs it and drops the report
    └── RequestError                   the operator is at fault (4xx)
        ├── InvalidRequest             400
        │   ├── InvalidSelector            --devices/--label/--class/--all or the JSON selector
        │   ├── InvalidWavePlan            --canary or --waves
        │   └── InvalidRolloutSettings     a threshold, margin or time out of range
        ├── Conflict                   409
        │   └── IllegalRolloutTransition   pause/resume/abort refused in the rollout's state
        └── Unprocessable              422
            └── EmptySelection             the selector matched no device

Each error carries the values it is about as attributes (``state``, ``event``, ``param``,
``value``), so no caller parses a message. Every refused transition leaves the state as it
was: the functions that raise them are pure and change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from edgelm_control.errors import Conflict, ControlError, InvalidRequest, Unprocessable

if TYPE_CHECKING:
    from edgelm_control.rollouts.device_states import DeviceEvent, DeviceState
    from edgelm_control.rollouts.rollout_states import RolloutEvent, RolloutState
    from edgelm_control.rollouts.selection import Selector


def _listed(events: Iterable[str]) -> str:
    names = sorted(str(e) for e in events)
    return ", ".join(names) if names else "nothing"


class IllegalTransition(ControlError):
    """A device row in ``state`` cannot take ``event``; ``allowed`` lists what it takes."""

    code = "illegal_device_transition"

    def __init__(
        self, state: DeviceState, event: DeviceEvent, allowed: frozenset[DeviceEvent]
    ) -> None:
        super().__init__(
            f"a device in state {state} cannot take {event}; it takes: {_listed(allowed)}"
        )
        self.state = state
        self.event = event
        self.allowed = allowed


class IllegalRolloutTransition(Conflict):
    """A rollout in ``state`` cannot take ``event`` (409 when the operator asked for it)."""

    code = "rollout_state_conflict"

    def __init__(
        self, state: RolloutState, event: RolloutEvent, allowed: frozenset[RolloutEvent]
    ) -> None:
        super().__init__(
            f"a {state} rollout cannot {event}; it takes: {_listed(allowed)}", param="state"
        )
        self.state = state
        self.event = event
        self.allowed = allowed


class InvalidSelector(InvalidRequest):
    """A selector is malformed. ``param`` is the CLI option or ``selector``; ``value`` came."""

    code = "invalid_selector"

    def __init__(self, message: str, *, param: str, value: object) -> None:
        super().__init__(message, param=param)
        self.value = value


class InvalidWavePlan(InvalidRequest):
    """A canary or wave-sizes text is malformed. ``param`` is ``canary`` or ``waves``."""

    code = "invalid_wave_plan"

    def __init__(self, message: str, *, param: str, value: object) -> None:
        super().__init__(message, param=param)
        self.value = value


class InvalidRolloutSettings(InvalidRequest):
    """A rollout setting is out of range. ``param`` is the setting's name."""

    code = "invalid_rollout_settings"

    def __init__(self, setting: str, expected: str, value: object) -> None:
        super().__init__(f"{setting} must be {expected}, got {value!r}", param=setting)
        self.setting = setting
        self.expected = expected
        self.value = value


class EmptySelection(Unprocessable):
    """The selector matched none of the ``device_count`` devices it was checked against."""

    code = "empty_selection"

    def __init__(self, selector: Selector, device_count: int) -> None:
        super().__init__(
            f"selector {selector.describe()} matched none of the {device_count} enrolled devices",
            param="selector",
        )
        self.selector = selector
        self.device_count = device_count
