"""The rollout engine's own motion: device reports, clocks and wave gates, from the store.

:meth:`RolloutDriver.step` first lets new or changed devices join the rollout they should
run (late joiners, :meth:`~.engine.RolloutEngine.consider`), then runs four passes, each a
function of stored state only, so a restarted control plane (or another replica) picks up
exactly where this one stopped and never restarts a wave:

1. **reports**: events stored by the ingest path and not yet applied, in the order each
   device sent them, become row events (:func:`~.reports.device_event_for`); each event is
   marked applied in the same transaction (a compare-and-set, so no replica applies one
   twice);
2. **state reports**: a device whose reported state shows it runs its previous model again,
   at or after the abort's desired state, has ``rolled_back``;
3. **clocks**: started rows get ``device_timeout`` or ``pending_expired`` when due
   (:func:`~.device_states.due_clock_event`);
4. **gates**: each running or paused rollout's current wave is evaluated until it has a
   verdict; the verdict is recorded once and becomes a rollout event
   (:func:`~.progress.wave_step`): the next wave starts, the rollout completes, halts, or
   fails with the effects of an abort.

It runs as a service: on a timer (``engine_tick_s``) and whenever the ingest path stores
events or sees devices change.

**Blind, it judges nothing.** While the control plane's own link to the broker is down it
cannot hear devices, so their silence says nothing about them: clocks and gates wait (reports
already stored are still applied). Once the link is back, silence is counted from that moment
and clocks wait :data:`SETTLE_S` more, so the retained presence and the reports queued in the
plane's persistent session arrive before any device is called ``timed_out`` or ``expired``.
A broker outage therefore never fails a wave by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Mapping

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.clock import Clock
from edgelm_control.errors import StoreUnavailable
from edgelm_control.hub import FleetHub
from edgelm_control.rollouts.actions import Changes, RolloutActions
from edgelm_control.rollouts.device_states import (
    DeviceEvent,
    DeviceState,
    allowed_events,
    due_clock_event,
)
from edgelm_control.rollouts.engine import RolloutEngine
from edgelm_control.rollouts.gates import GateResult, HealthFigures, WaveDevice, evaluate_wave
from edgelm_control.rollouts.progress import needs_gate, wave_step
from edgelm_control.rollouts.reports import (
    Report,
    RowFacts,
    device_event_for,
    state_means_rolled_back,
)
from edgelm_control.rollouts.rollout_states import (
    ACCEPTS_LATE_JOINERS,
    ENDED,
    RolloutEvent,
    RolloutState,
    next_rollout_state,
)
from edgelm_control.store import Store
from edgelm_control.store.devices import DeviceRecord, get_devices
from edgelm_control.store.events import EventRecord, mark_processed, unprocessed
from edgelm_control.store.ingest import WriteOutcome
from edgelm_control.store.rollouts import (
    RolloutRecord,
    RowRecord,
    cas_rollout,
    get_rollout,
    get_row,
    get_waves,
    record_verdict,
    rollouts_in,
    rows_in_states,
    rows_of,
    rows_of_devices,
)
from edgelm_protocol import EventKind

log = structlog.get_logger(__name__)

EVENTS_PER_TRANSACTION = 200
STORE_FAILURES = (OperationalError, InterfaceError)  # the database, not the event, failed
STARTED = frozenset({DeviceState.PENDING, DeviceState.DOWNLOADING, DeviceState.ACTIVATING})
FAILED_REPORTS = frozenset({DeviceEvent.INSTALL_FAILED, DeviceEvent.ACTIVATION_FAILED})
#: After the link to the broker comes back, clocks wait this long for the backlog to arrive.
SETTLE_S = 10.0


def _always_sees() -> bool:
    return True


def row_facts(row: RowRecord, rollout: RolloutRecord) -> RowFacts:
    return RowFacts(
        state=row.state,
        model=rollout.model,
        previous_model=row.previous_model,
        desired_sequence=row.desired_sequence,
        abort_sequence=row.abort_sequence,
        released=row.previous_target is None,
    )


class RolloutDriver:
    def __init__(
        self,
        *,
        store: Store,
        actions: RolloutActions,
        engine: RolloutEngine,
        clock: Clock,
        hub: FleetHub,
        tick_s: float,
        sees_fleet: Callable[[], bool] = _always_sees,
    ) -> None:
        """``sees_fleet`` says whether the plane's link to the broker is up right now."""
        self._store = store
        self._actions = actions
        self._engine = engine
        self._clock = clock
        self._hub = hub
        self._tick_s = tick_s
        self._wake = asyncio.Event()
        self._reported: set[str] = set()  # devices whose state changed since the last step
        self._joining: set[str] = set()  # new devices, or with a new class or labels
        self._sees_fleet = sees_fleet
        self._seeing_since_ms: int | None = None  # when the link last came up; None: blind

    def wake(self) -> None:
        self._wake.set()

    async def ingested(self, outcome: WriteOutcome) -> None:
        """The ingest path stored something: note it and wake the step (which does the
        work in this service's own task, so ingesting never waits for rollout work)."""
        for change in outcome.device_changes:
            if change.state_changed:
                self._reported.add(change.device_id)
            if change.facts_changed:
                self._joining.add(change.device_id)
            self._hub.publish(
                "device",
                {
                    "id": change.device_id,
                    "created": change.created,
                    "online": True if change.came_online else None,
                    "offline": True if change.went_offline else None,
                    "state_changed": change.state_changed,
                },
            )
        if outcome.new_events or outcome.device_changes:
            self.wake()

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except StoreUnavailable as exc:
                log.warning("rollout_step_store_unavailable", error=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._tick_s):
                    await self._wake.wait()
            self._wake.clear()

    async def step(self) -> None:
        changes = Changes()
        seeing_since_ms = self._watch_sight()
        await self.admit_late_joiners()
        await self.apply_reports(changes)
        await self.apply_state_reports(changes)
        if seeing_since_ms is not None:
            if self._clock.now_ms() - seeing_since_ms >= SETTLE_S * 1000:
                await self.apply_clocks(changes, seeing_since_ms=seeing_since_ms)
            await self.advance(changes)
        changes.publish(self._hub)
        await self._actions.director.publish_pending()

    def _watch_sight(self) -> int | None:
        """When the plane's link to the broker came up (``None`` while it is down)."""
        if not self._sees_fleet():
            if self._seeing_since_ms is not None:
                log.warning("rollouts_blind", reason="the link to the broker is down")
            self._seeing_since_ms = None
        elif self._seeing_since_ms is None:
            self._seeing_since_ms = self._clock.now_ms()
        return self._seeing_since_ms

    # --- 0. late joiners ---------------------------------------------------------------------

    async def admit_late_joiners(self) -> None:
        devices, self._joining = sorted(self._joining), set()
        for index, device_id in enumerate(devices):
            try:
                await self._engine.consider(device_id)
            except StoreUnavailable:
                self._joining.update(devices[index:])  # the next step tries them again
                raise

    # --- 1. reports --------------------------------------------------------------------------

    async def apply_reports(self, changes: Changes) -> int:
        applied = 0
        while True:
            async with self._store.read() as conn:
                batch = await unprocessed(conn, limit=EVENTS_PER_TRANSACTION)
            if not batch:
                return applied
            async with self._store.write() as conn:
                rollouts: dict[str, RolloutRecord | None] = {}
                for event in batch:
                    if not await mark_processed(conn, event.message_id, self._clock.now_ms()):
                        continue  # another replica applied it
                    try:
                        async with conn.begin_nested():  # one bad event cannot stall the rest
                            applied += await self._apply_report(conn, event, rollouts, changes)
                    except STORE_FAILURES:
                        raise
                    except Exception:
                        log.exception(
                            "rollout_report_failed",
                            message_id=event.message_id,
                            device=event.device_id,
                            kind=event.kind,
                        )
            if len(batch) < EVENTS_PER_TRANSACTION:
                return applied

    async def _apply_report(
        self,
        conn: AsyncConnection,
        event: EventRecord,
        rollouts: dict[str, RolloutRecord | None],
        changes: Changes,
    ) -> int:
        row = await self._row_for(conn, event)
        if row is None:
            return 0
        if row.rollout_id not in rollouts:
            rollouts[row.rollout_id] = await get_rollout(conn, row.rollout_id)
        rollout = rollouts[row.rollout_id]
        if rollout is None:
            return 0
        report = Report(EventKind(event.kind), event.model, event.desired_sequence)
        device_event = device_event_for(row_facts(row, rollout), report)
        if device_event is None:
            return 0
        if device_event not in allowed_events(row.state):
            log.debug(
                "rollout_report_ignored",
                rollout=row.rollout_id,
                device=row.device_id,
                state=str(row.state),
                kind=event.kind,
            )
            return 0
        values: dict[str, object] = {"last_report_ms": self._clock.now_ms()}
        reason = None
        if device_event is DeviceEvent.ACTIVATED and event.model == rollout.model:
            values["health_tokens_per_s"] = event.health_tokens_per_s
            values["health_ttft_ms"] = event.health_ttft_ms
        if device_event in FAILED_REPORTS:
            reason = f"{event.kind}: {event.reason or 'the device gave no reason'}"
        moved = await self._actions.move(conn, row, device_event, changes, reason=reason, **values)
        return 0 if moved is None else 1

    async def _row_for(self, conn: AsyncConnection, event: EventRecord) -> RowRecord | None:
        if event.rollout_id is not None:
            return await get_row(conn, event.rollout_id, event.device_id)
        if event.desired_sequence is None:
            return None
        # No rollout named: the row whose desired state (or abort) this report answers.
        rows = [
            r
            for r in await rows_of_devices(conn, [event.device_id])
            if r.desired_sequence is not None and r.desired_sequence <= event.desired_sequence
        ]
        return max(rows, key=lambda r: r.desired_sequence or 0, default=None)

    # --- 2. state reports --------------------------------------------------------------------

    async def apply_state_reports(self, changes: Changes) -> None:
        devices, self._reported = self._reported, set()
        if not devices:
            return
        async with self._store.write() as conn:
            rows = await rows_of_devices(conn, devices, states=[DeviceState.ROLLING_BACK])
            facts = await get_devices(conn, [r.device_id for r in rows])
            for row in rows:
                rollout = await get_rollout(conn, row.rollout_id)
                device = facts.get(row.device_id)
                if rollout is None or device is None:
                    continue
                if state_means_rolled_back(
                    row_facts(row, rollout),
                    active_model=device.active_model,
                    applied_sequence=device.applied_sequence,
                ):
                    await self._actions.move(
                        conn,
                        row,
                        DeviceEvent.ROLLED_BACK,
                        changes,
                        reason=f"runs {row.previous_model} again",
                        last_report_ms=self._clock.now_ms(),
                    )

    # --- 3. clocks ---------------------------------------------------------------------------

    async def apply_clocks(self, changes: Changes, *, seeing_since_ms: int = 0) -> None:
        now_ms = self._clock.now_ms()
        async with self._store.write() as conn:
            rows = await rows_in_states(conn, STARTED, rollout_states=ACCEPTS_LATE_JOINERS)
            if not rows:
                return
            facts = await get_devices(conn, [r.device_id for r in rows])
            rollouts: dict[str, RolloutRecord | None] = {}
            for row in rows:
                if row.rollout_id not in rollouts:
                    rollouts[row.rollout_id] = await get_rollout(conn, row.rollout_id)
                rollout = rollouts[row.rollout_id]
                device = facts.get(row.device_id)
                if rollout is None or device is None:
                    continue
                pending_since = row.pending_since_ms or row.created_ms
                # Time the plane could not hear anyone is nobody's silence.
                silent_since = max(
                    pending_since,
                    row.last_report_ms or 0,
                    device.online_since_ms or 0,
                    seeing_since_ms,
                )
                due = due_clock_event(
                    row.state,
                    online=device.online,
                    now_s=now_ms / 1000,
                    pending_since_s=pending_since / 1000,
                    silent_since_s=silent_since / 1000,
                    settings=rollout.settings,
                )
                if due is None:
                    continue
                if due is DeviceEvent.DEVICE_TIMEOUT:
                    silent_s = (now_ms - silent_since) // 1000
                    reason = f"device_timeout: online but silent for {silent_s} s"
                else:
                    away_s = (now_ms - pending_since) // 1000
                    reason = f"pending_expired: offline and pending for {away_s} s"
                await self._actions.move(conn, row, due, changes, reason=reason)

    # --- 4. gates ----------------------------------------------------------------------------

    async def advance(self, changes: Changes) -> None:
        async with self._store.read() as conn:
            active = await rollouts_in(conn, [RolloutState.RUNNING, RolloutState.PAUSED])
        for rollout in active:
            try:
                async with self._store.write() as conn:
                    current = await get_rollout(conn, rollout.rollout_id)
                    if current is not None:
                        await self._advance_one(conn, current, changes)
            except (StoreUnavailable, *STORE_FAILURES):
                raise
            except Exception:  # a bug in one rollout must not stop the others
                log.exception("rollout_advance_failed", rollout=rollout.rollout_id)

    async def _advance_one(
        self, conn: AsyncConnection, rollout: RolloutRecord, changes: Changes
    ) -> None:
        waves = await get_waves(conn, rollout.rollout_id)
        wave = rollout.current_wave
        record = waves[wave]
        rows = await rows_of(conn, rollout.rollout_id, wave=wave)
        if record.started_ms is None or any(r.state is DeviceState.WAITING for r in rows):
            if rollout.state is RolloutState.RUNNING:  # finish a start a crash interrupted
                await self._actions.start_wave(conn, rollout, wave, changes)
            return
        gate = None
        if needs_gate(rollout.state, record.verdict):
            gate = await self._evaluate(conn, rollout, wave)
        step = wave_step(
            rollout.state,
            wave=wave,
            wave_count=rollout.wave_count,
            recorded=record.verdict,
            gate=gate,
            on_failure=rollout.settings.on_failure,
            pause_between_waves=rollout.settings.pause_between_waves,
        )
        now_ms = self._clock.now_ms()
        if step.record is not None:
            tally = step.record.tally
            won = await record_verdict(
                conn,
                rollout.rollout_id,
                wave,
                verdict=str(step.record.verdict),
                code=str(step.record.code),
                reason=step.record.reason,
                tally=dataclasses.asdict(tally),
                now_ms=now_ms,
            )
            if not won:
                return
            log.info(
                "rollout_wave_decided",
                rollout=rollout.rollout_id,
                wave=wave,
                verdict=str(step.record.verdict),
                reason=step.record.reason,
            )
            changes.rollout(rollout.rollout_id, wave=wave, verdict=str(step.record.verdict))
        if step.event is not None:
            await self._fire(conn, rollout, step.event, changes, now_ms)

    async def _fire(
        self,
        conn: AsyncConnection,
        rollout: RolloutRecord,
        event: RolloutEvent,
        changes: Changes,
        now_ms: int,
    ) -> None:
        state = next_rollout_state(rollout.state, event)
        values: dict[str, object] = {"state": state, "updated_ms": now_ms}
        if event in (RolloutEvent.WAVE_PASSED, RolloutEvent.WAVE_PASSED_PAUSE):
            # Paused, the next wave is current but not started: resume starts it
            # (see _advance_one, which starts an unstarted wave of a running rollout).
            values["current_wave"] = rollout.current_wave + 1
        if state in ENDED:
            values["ended_ms"] = now_ms
        moved = await cas_rollout(
            conn,
            rollout.rollout_id,
            expected_state=rollout.state,
            expected_wave=rollout.current_wave,
            **values,
        )
        if not moved:
            return
        log.info("rollout_moved", rollout=rollout.rollout_id, cause=str(event), state=str(state))
        changes.rollout(rollout.rollout_id, state=str(state))
        current = await get_rollout(conn, rollout.rollout_id)
        assert current is not None
        if event is RolloutEvent.WAVE_PASSED:
            await self._actions.start_wave(conn, current, current.current_wave, changes)
        elif event is RolloutEvent.WAVE_FAILED_ABORT:
            await self._actions.abort_rows(
                conn, current, f"the rollout failed in wave {rollout.current_wave}", changes
            )

    async def _evaluate(
        self, conn: AsyncConnection, rollout: RolloutRecord, wave: int
    ) -> GateResult:
        rows = await rows_of(conn, rollout.rollout_id, wave=wave)
        facts = await get_devices(conn, [r.device_id for r in rows])
        return evaluate_wave(
            wave_devices(rows, facts),
            rollout.settings,
            canary=wave == 0,
            baselines=rollout.baselines,
        )


def wave_devices(rows: Iterable[RowRecord], facts: Mapping[str, DeviceRecord]) -> list[WaveDevice]:
    devices = []
    for row in rows:
        device = facts.get(row.device_id)
        health = None
        if row.health_tokens_per_s is not None or row.health_ttft_ms is not None:
            health = HealthFigures(row.health_tokens_per_s, row.health_ttft_ms)
        devices.append(
            WaveDevice(
                device_id=row.device_id,
                state=row.state,
                online=device is not None and device.online,
                hardware_class=None if device is None else device.hardware_class,
                health=health,
            )
        )
    return devices
