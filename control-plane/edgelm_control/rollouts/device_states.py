"""One device's part in one rollout, as a transition table. Pure: state and event in, state out.

A row exists per (rollout, device) and starts ``waiting``. Its events come from the device's
reports (the shell maps a report about *this rollout's* desired state to an event, by the
``desired_sequence`` it names), from the control plane's clock (:func:`due_clock_event`) and
from the operator and the engine (``wave_started``, ``abort``, ``supersede``)::

    waiting ──wave_started──► pending ──download_started──► downloading ⟲ download_started
                               │  │                             │           (progress reports)
                               │  └───────installed──────┐      │ installed
                               │                          ▼     ▼
                               │                         activating
                               │                              │ activated
                               └────activated────────────────►succeeded
                                    (downloading, too: a model already installed and fast)

    pending, downloading ──install_failed──► failed ◄──activation_failed── pending,
                                                                downloading, activating
    pending, downloading, activating ──device_timeout──► timed_out
    pending ──pending_expired──► expired

    timed_out, expired ── a late report ──► where pending would go on it:
        download_started → downloading, installed → activating, activated → succeeded,
        install_failed / activation_failed → failed

    abort:      waiting, pending, downloading, expired ──► cancelled
                activating, succeeded, timed_out ──► rolling_back ──rolled_back──► rolled_back
                cancelled ──activated──► rolling_back     (it switched before it heard the abort)
                rolling_back ──activated──► rolling_back  (a late report of the new model)
    supersede:  waiting, pending, downloading, activating, succeeded, timed_out, expired,
                rolling_back ──► superseded
    revoke:     waiting, pending, downloading, activating, succeeded, timed_out, expired,
                cancelled, rolling_back ──► revoked

Why the rows that go beyond the obvious:

- ``timed_out`` and ``expired`` take late reports. The device's desired state stays retained,
  so a device that was silent or away still installs the model when it gets to it; its row
  follows, so the status never says "timed out" about a device that runs the new model. The
  engine records a wave's verdict when it is reached, so a late revival does not reopen a wave
  that has already failed (see :mod:`edgelm_control.rollouts.gates`).
- ``timed_out --abort--> rolling_back``, not ``cancelled``: a silent device may have switched,
  and the abort's desired state names the previous model either way. The row waits for the
  device to say it runs the previous model, which is the truthful thing to wait for.
- ``cancelled --activated--> rolling_back``: an offline-first device can finish a download
  from a site mirror and activate before its broker link brings the abort; the abort's desired
  state then brings it back, and the row says so meanwhile. Other late reports to a cancelled
  row are refused: it stays truthful without them (the device does not run the new model).
- ``downloading --activation_failed--> failed``: a device with the model already installed
  reports ``desired_accepted`` (mapped to ``download_started``) and then its activation,
  without an ``installed`` in between; failure is as possible as success there.
- ``revoke`` (the operator revoked the device) takes a row out of its rollout from every
  state that is not closed, ``succeeded`` included: a revoked device is out of the fleet, and
  nothing it reported can be trusted any more. ``revoked`` is not eligible for the gates, like
  ``superseded``: revoking a device (it was stolen, say) says nothing about the model, so it
  neither fails nor passes a wave, and a canary with no eligible device left still needs a
  success from another. Its desired state is withdrawn, so an abort has nothing to undo there.
- ``failed``, ``rolled_back``, ``superseded`` and ``revoked`` take nothing at all
  (:data:`CLOSED`). A newer rollout leaves ``failed`` and ``cancelled`` rows alone: nothing
  waits behind them.

Any other (state, event) pair raises :class:`IllegalTransition` and changes nothing; the shell
logs it and drops the report (duplicates and stragglers are expected under QoS 1).
"""

from __future__ import annotations

from enum import StrEnum

from edgelm_control.rollouts.errors import IllegalTransition
from edgelm_control.rollouts.settings import RolloutSettings

__all__ = [
    "CLOSED",
    "FAILURES",
    "FINAL",
    "HOLDS_DESIRED_STATE",
    "INITIAL",
    "IN_PROGRESS",
    "NOT_ELIGIBLE",
    "TRANSITIONS",
    "DeviceEvent",
    "DeviceState",
    "IllegalTransition",
    "allowed_events",
    "due_clock_event",
    "next_device_state",
]


class DeviceState(StrEnum):
    WAITING = "waiting"  # in a wave that has not started
    PENDING = "pending"  # desired state issued and retained; no report yet (may be offline)
    DOWNLOADING = "downloading"
    ACTIVATING = "activating"  # installed and verified; loading and health-checking
    SUCCEEDED = "succeeded"  # activated and passed its on-device health check
    FAILED = "failed"  # install or activation failed; the device kept its previous model
    TIMED_OUT = "timed_out"  # notified, then silent past device_timeout_s
    EXPIRED = "expired"  # pending and offline past pending_expiry_s
    CANCELLED = "cancelled"  # aborted before it switched
    ROLLING_BACK = "rolling_back"  # aborted after it may have switched; waiting for its report
    ROLLED_BACK = "rolled_back"  # runs the previous model again
    SUPERSEDED = "superseded"  # a newer rollout took this device over
    REVOKED = "revoked"  # the operator revoked the device: out of the fleet for good


class DeviceEvent(StrEnum):
    WAVE_STARTED = "wave_started"
    DOWNLOAD_STARTED = "download_started"  # desired_accepted, download_started or _progress
    INSTALLED = "installed"
    ACTIVATED = "activated"
    INSTALL_FAILED = "install_failed"  # install_failed, or desired_rejected
    ACTIVATION_FAILED = "activation_failed"
    DEVICE_TIMEOUT = "device_timeout"
    PENDING_EXPIRED = "pending_expired"
    ABORT = "abort"
    SUPERSEDE = "supersede"
    ROLLED_BACK = "rolled_back"  # the device reports that it runs the previous model again
    REVOKE = "revoke"  # the operator revoked the device


S = DeviceState
E = DeviceEvent

TRANSITIONS: dict[tuple[DeviceState, DeviceEvent], DeviceState] = {
    (S.WAITING, E.WAVE_STARTED): S.PENDING,
    (S.WAITING, E.ABORT): S.CANCELLED,
    (S.WAITING, E.SUPERSEDE): S.SUPERSEDED,
    (S.WAITING, E.REVOKE): S.REVOKED,
    (S.PENDING, E.DOWNLOAD_STARTED): S.DOWNLOADING,
    (S.PENDING, E.INSTALLED): S.ACTIVATING,
    (S.PENDING, E.ACTIVATED): S.SUCCEEDED,
    (S.PENDING, E.INSTALL_FAILED): S.FAILED,
    (S.PENDING, E.ACTIVATION_FAILED): S.FAILED,
    (S.PENDING, E.DEVICE_TIMEOUT): S.TIMED_OUT,
    (S.PENDING, E.PENDING_EXPIRED): S.EXPIRED,
    (S.PENDING, E.ABORT): S.CANCELLED,
    (S.PENDING, E.SUPERSEDE): S.SUPERSEDED,
    (S.PENDING, E.REVOKE): S.REVOKED,
    (S.DOWNLOADING, E.DOWNLOAD_STARTED): S.DOWNLOADING,
    (S.DOWNLOADING, E.INSTALLED): S.ACTIVATING,
    (S.DOWNLOADING, E.ACTIVATED): S.SUCCEEDED,
    (S.DOWNLOADING, E.INSTALL_FAILED): S.FAILED,
    (S.DOWNLOADING, E.ACTIVATION_FAILED): S.FAILED,
    (S.DOWNLOADING, E.DEVICE_TIMEOUT): S.TIMED_OUT,
    (S.DOWNLOADING, E.ABORT): S.CANCELLED,
    (S.DOWNLOADING, E.SUPERSEDE): S.SUPERSEDED,
    (S.DOWNLOADING, E.REVOKE): S.REVOKED,
    (S.ACTIVATING, E.ACTIVATED): S.SUCCEEDED,
    (S.ACTIVATING, E.ACTIVATION_FAILED): S.FAILED,
    (S.ACTIVATING, E.DEVICE_TIMEOUT): S.TIMED_OUT,
    (S.ACTIVATING, E.ABORT): S.ROLLING_BACK,
    (S.ACTIVATING, E.SUPERSEDE): S.SUPERSEDED,
    (S.ACTIVATING, E.REVOKE): S.REVOKED,
    (S.SUCCEEDED, E.ABORT): S.ROLLING_BACK,
    (S.SUCCEEDED, E.SUPERSEDE): S.SUPERSEDED,
    (S.SUCCEEDED, E.REVOKE): S.REVOKED,
    (S.TIMED_OUT, E.DOWNLOAD_STARTED): S.DOWNLOADING,
    (S.TIMED_OUT, E.INSTALLED): S.ACTIVATING,
    (S.TIMED_OUT, E.ACTIVATED): S.SUCCEEDED,
    (S.TIMED_OUT, E.INSTALL_FAILED): S.FAILED,
    (S.TIMED_OUT, E.ACTIVATION_FAILED): S.FAILED,
    (S.TIMED_OUT, E.ABORT): S.ROLLING_BACK,
    (S.TIMED_OUT, E.SUPERSEDE): S.SUPERSEDED,
    (S.TIMED_OUT, E.REVOKE): S.REVOKED,
    (S.EXPIRED, E.DOWNLOAD_STARTED): S.DOWNLOADING,
    (S.EXPIRED, E.INSTALLED): S.ACTIVATING,
    (S.EXPIRED, E.ACTIVATED): S.SUCCEEDED,
    (S.EXPIRED, E.INSTALL_FAILED): S.FAILED,
    (S.EXPIRED, E.ACTIVATION_FAILED): S.FAILED,
    (S.EXPIRED, E.ABORT): S.CANCELLED,
    (S.EXPIRED, E.SUPERSEDE): S.SUPERSEDED,
    (S.EXPIRED, E.REVOKE): S.REVOKED,
    (S.CANCELLED, E.ACTIVATED): S.ROLLING_BACK,
    (S.CANCELLED, E.REVOKE): S.REVOKED,
    (S.ROLLING_BACK, E.ROLLED_BACK): S.ROLLED_BACK,
    (S.ROLLING_BACK, E.ACTIVATED): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.SUPERSEDE): S.SUPERSEDED,
    (S.ROLLING_BACK, E.REVOKE): S.REVOKED,
}

INITIAL = S.WAITING

#: The device's part in its wave is over; only the exits drawn above move it again.
FINAL = frozenset(
    {
        S.SUCCEEDED,
        S.FAILED,
        S.TIMED_OUT,
        S.EXPIRED,
        S.CANCELLED,
        S.ROLLED_BACK,
        S.SUPERSEDED,
        S.REVOKED,
    }
)
#: No event moves these at all.
CLOSED = frozenset({S.FAILED, S.ROLLED_BACK, S.SUPERSEDED, S.REVOKED})

# The gate's view. Together with WAITING and SUCCEEDED these partition the states.
#: Started and not settled; a ``pending`` device counts only while it is online.
IN_PROGRESS = frozenset({S.PENDING, S.DOWNLOADING, S.ACTIVATING})
#: Count against the failure threshold.
FAILURES = frozenset({S.FAILED, S.TIMED_OUT})
#: Left out of a wave's denominator (as is a ``pending`` device that is offline). The
#: rollback states only exist after an abort, when no gate is evaluated; they are here so
#: that the gate is total.
NOT_ELIGIBLE = frozenset(
    {S.EXPIRED, S.SUPERSEDED, S.CANCELLED, S.ROLLING_BACK, S.ROLLED_BACK, S.REVOKED}
)

#: The device holds this rollout's desired state (retained): an abort must publish a newer one
#: naming the model the device ran before, and a superseding rollout replaces it.
HOLDS_DESIRED_STATE = frozenset(
    {S.PENDING, S.DOWNLOADING, S.ACTIVATING, S.SUCCEEDED, S.TIMED_OUT, S.EXPIRED}
)

_ALLOWED: dict[DeviceState, frozenset[DeviceEvent]] = {
    state: frozenset(e for (s, e) in TRANSITIONS if s == state) for state in DeviceState
}


def allowed_events(state: DeviceState) -> frozenset[DeviceEvent]:
    """The events ``state`` takes (for instance: should a newer rollout supersede this row?)."""
    return _ALLOWED[state]


def next_device_state(state: DeviceState, event: DeviceEvent) -> DeviceState:
    """Where ``event`` takes a row in ``state``; :class:`IllegalTransition` if nowhere."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event, _ALLOWED[state]) from None


def due_clock_event(
    state: DeviceState,
    *,
    online: bool,
    now_s: float,
    pending_since_s: float,
    silent_since_s: float,
    settings: RolloutSettings,
) -> DeviceEvent | None:
    """The clock event due for a row at ``now_s``, if any.

    ``pending_since_s`` is when the device's wave started (its desired state was issued);
    ``silent_since_s`` is the later of its last report and the moment it was last seen coming
    online. A pending device that is offline waits for ``pending_expiry_s``: being away is not
    a failure. A pending device that is online was notified, so its silence past
    ``device_timeout_s`` is one. A device that has started (downloading, activating) times out
    on silence whether or not it looks online: one that went quiet mid-install must not hold
    its wave forever, and if it comes back its late reports revive the row.
    """
    silent_for_s = now_s - silent_since_s
    if state is S.PENDING:
        if online:
            return E.DEVICE_TIMEOUT if silent_for_s >= settings.device_timeout_s else None
        if now_s - pending_since_s >= settings.pending_expiry_s:
            return E.PENDING_EXPIRED
        return None
    if state in (S.DOWNLOADING, S.ACTIVATING) and silent_for_s >= settings.device_timeout_s:
        return E.DEVICE_TIMEOUT
    return None
