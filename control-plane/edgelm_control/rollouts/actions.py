"""The engine's building blocks: each moves rows inside the caller's transaction.

Every row change goes through :meth:`RolloutActions.move`, which asks the pure transition
table (:func:`~.device_states.next_device_state`) where the event leads and writes it with a
compare-and-set; a row another replica moved first is left alone. A revoked device's row
moves only to ``revoked``: :meth:`~RolloutActions.move` orders itself against revocations
and turns any event for a revoked device into ``revoke``, and the director issues nothing
for it (:meth:`~edgelm_control.director.Director.issue` answers None). Desired states are issued
by the director in the same transaction, so a row is ``pending`` exactly when its desired
state is stored (published after the commit).

:class:`Changes` collects what a transaction changed, for the SSE hub once it commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.clock import Clock
from edgelm_control.director import Assignment, Director
from edgelm_control.hub import FleetHub
from edgelm_control.metrics import ControlMetrics
from edgelm_control.rollouts.device_states import (
    HOLDS_DESIRED_STATE,
    DeviceEvent,
    DeviceState,
    allowed_events,
    next_device_state,
)
from edgelm_control.store.devices import get_devices
from edgelm_control.store.revocations import get_revocation
from edgelm_control.store.rollouts import (
    RolloutRecord,
    RowRecord,
    cas_row,
    get_row,
    rows_of,
    rows_of_devices,
    start_wave,
)
from edgelm_protocol import TargetRef

log = structlog.get_logger(__name__)


@dataclass
class Changes:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rollouts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def row(self, row: RowRecord, state: DeviceState, reason: str | None) -> None:
        self.rows.append(
            {
                "rollout": row.rollout_id,
                "device": row.device_id,
                "wave": row.wave,
                "state": str(state),
                "reason": reason,
            }
        )

    def rollout(self, rollout_id: str, **facts: Any) -> None:
        self.rollouts.setdefault(rollout_id, {"id": rollout_id}).update(facts)

    def publish(self, hub: FleetHub) -> None:
        for facts in self.rollouts.values():
            hub.publish("rollout", facts)
        for row in self.rows:
            hub.publish("rollout", {"id": row["rollout"], "device_state": row})


class RolloutActions:
    def __init__(self, *, director: Director, clock: Clock, metrics: ControlMetrics) -> None:
        self.director = director
        self.clock = clock
        self.metrics = metrics

    async def move(
        self,
        conn: AsyncConnection,
        row: RowRecord,
        event: DeviceEvent,
        changes: Changes,
        *,
        reason: str | None = None,
        **values: Any,
    ) -> DeviceState | None:
        """Apply ``event`` to ``row``; the new state, or None if another writer moved it.

        If the device is revoked, the row takes ``revoke`` instead (with the revocation's
        note, without ``values``), or nothing if it is closed: whatever a transaction read
        before the revocation committed, it cannot move the row anywhere else after."""
        # Before the row lock: the revocation takes its lock first too, so the two cannot
        # deadlock, and one that committed is seen here.
        revocation = await get_revocation(conn, row.device_id, lock=True)
        if revocation is not None and event is not DeviceEvent.REVOKE:
            if DeviceEvent.REVOKE not in allowed_events(row.state):
                return None
            event, reason, values = DeviceEvent.REVOKE, revocation.note, {}
        state = next_device_state(row.state, event)
        moved = await cas_row(
            conn,
            row.rollout_id,
            row.device_id,
            expected=row.state,
            state=state,
            reason=reason if reason is not None else row.reason,
            updated_ms=self.clock.now_ms(),
            **values,
        )
        if not moved:
            return None
        if state is not row.state:
            self.metrics.device_transitions.labels(str(state)).inc()
            changes.row(row, state, reason)
            log.info(
                "rollout_device_moved",
                rollout=row.rollout_id,
                device=row.device_id,
                cause=str(event),
                old=str(row.state),
                new=str(state),
                reason=reason,
            )
        return state

    async def start_wave(
        self, conn: AsyncConnection, rollout: RolloutRecord, wave: int, changes: Changes
    ) -> None:
        """Mark ``wave`` started and start its waiting rows (idempotent: a crash halfway
        leaves waiting rows that the next call starts, and started rows alone)."""
        await start_wave(conn, rollout.rollout_id, wave, self.clock.now_ms())
        rows = await rows_of(conn, rollout.rollout_id, wave=wave)
        waiting = [r for r in rows if r.state is DeviceState.WAITING]
        await self.start_rows(conn, rollout, waiting, changes)
        changes.rollout(rollout.rollout_id, current_wave=wave)

    async def start_rows(
        self,
        conn: AsyncConnection,
        rollout: RolloutRecord,
        rows: Sequence[RowRecord],
        changes: Changes,
    ) -> None:
        """``waiting`` → ``pending``, each with its desired state issued."""
        if not rows:
            return
        ids = [r.device_id for r in rows]
        await self.supersede(conn, ids, rollout, changes, waiting_only=False)
        facts = await get_devices(conn, ids)
        target = TargetRef(rollout.target_path, rollout.target_length, rollout.target_sha256)
        now_ms = self.clock.now_ms()
        for row in rows:
            device = facts.get(row.device_id)
            sequence = await self.director.issue(
                conn,
                row.device_id,
                Assignment(rollout.model, target, rollout.rollout_id),
                floor=0 if device is None else device.applied_sequence,
            )
            # None: the device is revoked, and the move below revokes its row instead.
            await self.move(
                conn,
                row,
                DeviceEvent.WAVE_STARTED,
                changes,
                desired_sequence=sequence,
                pending_since_ms=now_ms,
            )

    async def supersede(
        self,
        conn: AsyncConnection,
        device_ids: Iterable[str],
        by: RolloutRecord,
        changes: Changes,
        *,
        waiting_only: bool,
    ) -> None:
        """A newer rollout takes these devices: their open rows elsewhere are superseded.

        A rollout takes a device in two steps. When it is created (or the device joins it
        late), the device's ``waiting`` rows in older rollouts are superseded, so an older
        rollout never starts it again. When its wave starts and the new desired state is
        issued, every other open row of the device is superseded (``waiting_only`` False):
        until that moment the older rollout's desired state is the one the device holds,
        and its row keeps telling the truth about it.
        """
        for row in await rows_of_devices(conn, device_ids):
            if row.rollout_id == by.rollout_id:
                continue
            if waiting_only and row.state is not DeviceState.WAITING:
                continue
            if DeviceEvent.SUPERSEDE not in allowed_events(row.state):
                continue
            await self.move(
                conn, row, DeviceEvent.SUPERSEDE, changes, reason=f"superseded by {by.rollout_id}"
            )

    async def abort_rows(
        self, conn: AsyncConnection, rollout: RolloutRecord, reason: str, changes: Changes
    ) -> None:
        """An abort's effects on every row: not started → cancelled; holding the new desired
        state → a newer one naming the model the device ran before (cancels a download in
        flight, rolls back a device that switched)."""
        rows = await rows_of(conn, rollout.rollout_id)
        facts = await get_devices(conn, [r.device_id for r in rows])
        for row in rows:
            if DeviceEvent.ABORT not in allowed_events(row.state):
                continue
            values: dict[str, Any] = {}
            note = reason
            if row.state in HOLDS_DESIRED_STATE:
                previous = row.previous_target
                device = facts.get(row.device_id)
                # None: the device is revoked, and the move below revokes its row instead.
                values["abort_sequence"] = await self.director.issue(
                    conn,
                    row.device_id,
                    Assignment(
                        row.previous_model,
                        None if previous is None else TargetRef(*previous),
                        rollout.rollout_id,
                    ),
                    floor=0 if device is None else device.applied_sequence,
                )
                if previous is None:
                    note = (
                        f"{reason}; the fleet has no model it ran before, so it is released: "
                        "it stops the download, and unloads this rollout's model if it "
                        "switched to it (or goes back to a model of its own)"
                    )
            await self.move(conn, row, DeviceEvent.ABORT, changes, reason=note, **values)

    async def revoke_rows(
        self, conn: AsyncConnection, device_id: str, reason: str, changes: Changes
    ) -> list[str]:
        """A revoked device leaves every rollout it is in: each of its rows that takes
        ``revoke`` moves to ``revoked``. Return the rollouts it left.

        A writer that does not order itself against revocations (a replica of an earlier
        release) may move a row between this read and its compare-and-set, which then
        misses: the row is read again and revoked from where that writer left it, until it
        is revoked or closed. Each miss is another writer's committed move, so this ends."""
        left = []
        for row in await rows_of_devices(conn, [device_id]):
            current: RowRecord | None = row
            while current is not None and DeviceEvent.REVOKE in allowed_events(current.state):
                moved = await self.move(conn, current, DeviceEvent.REVOKE, changes, reason=reason)
                if moved is not None:
                    left.append(current.rollout_id)
                    break
                current = await get_row(conn, current.rollout_id, current.device_id)
        return sorted(left)
