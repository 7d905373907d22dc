"""Which row event a device's report means. Pure: a row and a report in, an event out.

A device reports what it does with the desired state it holds, as ``event`` messages that
name the model (``name@version``), the desired state's sequence and its rollout. The engine
finds the row the report is about and asks :func:`device_event_for` what it means for it:

==================================================  =========================================
report (about the row's new model)                   row event
==================================================  =========================================
desired_accepted, download_started,                  ``download_started``
download_progress
installed                                            ``installed``
install_failed, desired_rejected                     ``install_failed``
activated                                            ``activated`` (success: it *runs* it)
activation_failed                                    ``activation_failed``
install_cancelled, rolled_back, deactivated,         nothing (the device's own bookkeeping;
download_retrying                                    a retry is not progress)
==================================================  =========================================

After an abort the row waits for the device to run its previous model again: a report of
``activated`` (or ``rolled_back``) naming the row's previous model, for a desired state at or
after the abort's (``desired_sequence >= abort_sequence``), is ``rolled_back``. A
:class:`~edgelm_protocol.ReportedState` with the previous model active and an applied
sequence at or after the abort's means the same (:func:`state_means_rolled_back`); for a device
that ran no model before, "previous" is no model at all.

Reports about another model, or about a desired state older than the row's, mean nothing for
the row (a straggler from an earlier rollout); so does a kind with no row event.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from edgelm_control.rollouts.device_states import DeviceEvent, DeviceState
from edgelm_protocol import EventKind

K = EventKind
E = DeviceEvent

REPORT_EVENTS = MappingProxyType(
    {
        K.DESIRED_ACCEPTED: E.DOWNLOAD_STARTED,
        K.DOWNLOAD_STARTED: E.DOWNLOAD_STARTED,
        K.DOWNLOAD_PROGRESS: E.DOWNLOAD_STARTED,
        K.INSTALLED: E.INSTALLED,
        K.INSTALL_FAILED: E.INSTALL_FAILED,
        K.DESIRED_REJECTED: E.INSTALL_FAILED,
        K.ACTIVATED: E.ACTIVATED,
        K.ACTIVATION_FAILED: E.ACTIVATION_FAILED,
    }
)
"""Reports about the row's new model, and the row event each means."""

BACK_ON_PREVIOUS = frozenset({K.ACTIVATED, K.ROLLED_BACK})


@dataclass(frozen=True)
class RowFacts:
    """What the mapping needs to know about a row."""

    state: DeviceState
    model: str  # the rollout's model, name@version
    previous_model: str | None
    desired_sequence: int | None
    abort_sequence: int | None
    #: The abort sent a release (the fleet could not name a previous model): the device
    #: undoes the rollout's switch by its own lights, so what it runs after is its own.
    released: bool = False


@dataclass(frozen=True)
class Report:
    kind: EventKind
    model: str | None
    desired_sequence: int | None


def device_event_for(row: RowFacts, report: Report) -> DeviceEvent | None:
    """The row event ``report`` means, or None if it means nothing for this row."""
    if row.abort_sequence is not None and _back_on_previous(row, report):
        return E.ROLLED_BACK
    if report.model is not None and report.model != row.model:
        return None
    if (
        row.desired_sequence is not None
        and report.desired_sequence is not None
        and report.desired_sequence < row.desired_sequence
    ):
        return None
    return REPORT_EVENTS.get(report.kind)


def _back_on_previous(row: RowFacts, report: Report) -> bool:
    assert row.abort_sequence is not None
    return (
        report.kind in BACK_ON_PREVIOUS
        and row.previous_model is not None
        and report.model == row.previous_model
        and report.model != row.model
        and (report.desired_sequence or 0) >= row.abort_sequence
    )


def state_means_rolled_back(
    row: RowFacts, *, active_model: str | None, applied_sequence: int
) -> bool:
    """Whether a device's reported state shows the row's rollback done: it applied the
    abort's desired state and runs what it ran before the rollout. After a release, anything
    but the rollout's model will do: nothing, if it ran nothing, or a model of its own (the
    registry's previous one may differ from what the row saw when the rollout began)."""
    if (
        row.state is not DeviceState.ROLLING_BACK
        or row.abort_sequence is None
        or applied_sequence < row.abort_sequence
    ):
        return False
    if row.released:
        return active_model != row.model
    return active_model == row.previous_model
