"""The rollout engine's operator side: create, pause, resume, abort, late joiners, revocation.

Each call is one store transaction built from the pure core (selection, wave planning,
transition tables) and :class:`~.actions.RolloutActions`; desired states it issues are
published after the commit, and the SSE hub hears what changed. The clock-and-report side,
which moves rollouts on its own, is :class:`~.driver.RolloutDriver`.

Creation, in one transaction:

1. resolve ``name@version`` to its TUF target (the model index);
2. select the devices the store knows, revoked ones excepted
   (:func:`~.selection.select_devices`), and plan the
   waves (:func:`~.waves.plan_waves`), recording each device's current model as the one an
   abort brings back, with its target if the repository has it;
3. compute the health gate's baselines from earlier ``activated`` events;
4. supersede the devices' waiting rows in older rollouts (latest wins; rows that hold an
   older rollout's desired state are superseded when this rollout issues its own);
5. insert the rollout, its waves and its rows, and start the first wave.

Late joiners: a device seen for the first time, or whose class or labels changed, joins the
newest rollout that accepts late joiners and whose selector matches it, unless it already is
in that rollout or in a newer one. It joins the last wave as ``waiting``, and starts at once
if that wave has started (a completed rollout's has). A revoked device joins nothing.

Revocation: a revoked device leaves every rollout it is in, by the ``revoke`` row event
(``revoked``, which the gates leave out like ``superseded``), in the revocation's transaction
(:mod:`edgelm_control.revocation`).
"""

from __future__ import annotations

import uuid

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.clock import Clock
from edgelm_control.errors import Conflict, NotFound
from edgelm_control.hub import FleetHub
from edgelm_control.rollouts.actions import Changes, RolloutActions
from edgelm_control.rollouts.baselines import compute_baselines, previous_models_by_class
from edgelm_control.rollouts.device_states import INITIAL
from edgelm_control.rollouts.progress import ACCEPTED, FAILED
from edgelm_control.rollouts.request import RolloutRequest
from edgelm_control.rollouts.rollout_states import (
    ACCEPTS_LATE_JOINERS,
    ENDED,
    RolloutEvent,
    RolloutState,
    next_rollout_state,
    wave_passed_event,
)
from edgelm_control.rollouts.selection import select_devices, selector_from_json
from edgelm_control.rollouts.waves import plan_waves
from edgelm_control.store import Store
from edgelm_control.store.devices import DeviceRecord, get_device, targetable_devices
from edgelm_control.store.events import health_samples
from edgelm_control.store.models import ModelRecord, get_model, get_models
from edgelm_control.store.revocations import get_revocation
from edgelm_control.store.rollouts import (
    RolloutRecord,
    RowRecord,
    cas_rollout,
    get_rollout,
    get_waves,
    insert_rollout,
    insert_rows,
    insert_waves,
    record_verdict,
    rollouts_in,
    rows_of_devices,
)

log = structlog.get_logger(__name__)


def new_rollout_id() -> str:
    return f"ro-{uuid.uuid4().hex[:16]}"


class RolloutEngine:
    def __init__(
        self,
        *,
        store: Store,
        actions: RolloutActions,
        clock: Clock,
        hub: FleetHub,
    ) -> None:
        self._store = store
        self._actions = actions
        self._clock = clock
        self._hub = hub

    async def _published(self, changes: Changes) -> None:
        changes.publish(self._hub)
        await self._actions.director.publish_pending()

    async def published(self, changes: Changes) -> None:
        """After a caller's commit: tell the SSE hub, publish the desired states it left."""
        await self._published(changes)

    # --- revocation --------------------------------------------------------------------------

    async def revoke_device(
        self, conn: AsyncConnection, device_id: str, *, reason: str, changes: Changes
    ) -> list[str]:
        """In the caller's transaction, take a revoked device out of its rollouts; return
        their ids. Call :meth:`published` after the commit."""
        return await self._actions.revoke_rows(conn, device_id, reason, changes)

    # --- creation ----------------------------------------------------------------------------

    async def create(self, request: RolloutRequest) -> str:
        """Create a rollout and start its first wave; return its id."""
        changes = Changes()
        now_ms = self._clock.now_ms()
        async with self._store.write() as conn:
            model = await get_model(conn, request.model)
            if model is None:
                raise NotFound(
                    f"model {request.model} is not in the fleet's repository; push it first",
                    param="model",
                )
            known = {d.device_id: d for d in await targetable_devices(conn)}
            chosen = select_devices(request.selector, known.values())
            plan = plan_waves(chosen, request.waves)
            previous = {d: known[d].active_model for d in chosen}
            targets = await get_models(conn, [m for m in previous.values() if m is not None])
            by_class = previous_models_by_class(
                (known[d].hardware_class, previous[d]) for d in chosen
            )
            models = set().union(*by_class.values()) if by_class else set()
            samples = await health_samples(conn, models)
            rollout = RolloutRecord(
                rollout_id=new_rollout_id(),
                model=model.model,
                target_path=model.path,
                target_length=model.length,
                target_sha256=model.sha256,
                selector=request.selector.to_json(),
                settings=request.settings,
                baselines=compute_baselines(samples, by_class),
                state=RolloutState.RUNNING,
                current_wave=0,
                wave_count=len(plan.waves),
                created_ms=now_ms,
                updated_ms=now_ms,
                ended_ms=None,
            )
            await insert_rollout(conn, rollout)
            await insert_waves(conn, rollout.rollout_id, rollout.wave_count)
            await self._actions.supersede(conn, chosen, rollout, changes, waiting_only=True)
            rows = [
                new_row(rollout.rollout_id, known[d], wave, targets.get(previous[d] or ""), now_ms)
                for wave, ids in enumerate(plan.waves)
                for d in ids
            ]
            await insert_rows(conn, rows)
            await self._actions.start_wave(conn, rollout, 0, changes)
        changes.rollout(rollout.rollout_id, state=str(rollout.state), created=True)
        log.info(
            "rollout_created",
            rollout=rollout.rollout_id,
            model=rollout.model,
            devices=len(chosen),
            waves=[len(w) for w in plan.waves],
            selector=request.selector.describe(),
        )
        await self._published(changes)
        return rollout.rollout_id

    # --- operator events ---------------------------------------------------------------------

    async def pause(self, rollout_id: str) -> None:
        await self._operator(rollout_id, RolloutEvent.PAUSE)

    async def resume(self, rollout_id: str) -> None:
        await self._operator(rollout_id, RolloutEvent.RESUME)

    async def abort(self, rollout_id: str) -> None:
        await self._operator(rollout_id, RolloutEvent.ABORT)

    async def _operator(self, rollout_id: str, event: RolloutEvent) -> None:
        changes = Changes()
        async with self._store.write() as conn:
            rollout = await get_rollout(conn, rollout_id)
            if rollout is None:
                raise NotFound(f"no rollout {rollout_id}", param="id")
            state = next_rollout_state(rollout.state, event)  # 409 when not allowed
            now_ms = self._clock.now_ms()
            wave = rollout.current_wave
            values: dict[str, object] = {"state": state, "updated_ms": now_ms}
            if state in ENDED:
                values["ended_ms"] = now_ms
            resumed_halted = event is RolloutEvent.RESUME and rollout.state is RolloutState.HALTED
            if resumed_halted:
                # The operator has looked at the failed wave and accepts it: move on.
                await record_verdict(
                    conn,
                    rollout_id,
                    wave,
                    verdict=ACCEPTED,
                    code="accepted",
                    reason="accepted: the operator resumed after the wave failed",
                    tally={},
                    now_ms=now_ms,
                    expected=FAILED,
                )
                passed = wave_passed_event(wave, rollout.wave_count)
                state = next_rollout_state(state, passed)
                values["state"] = state
                if passed is RolloutEvent.LAST_WAVE_PASSED:
                    values["ended_ms"] = now_ms
                else:
                    values["current_wave"] = wave + 1
            moved = await cas_rollout(
                conn, rollout_id, expected_state=rollout.state, expected_wave=wave, **values
            )
            if not moved:
                raise Conflict(
                    f"rollout {rollout_id} changed while handling {event}; look and retry",
                    param="id",
                )
            current = await get_rollout(conn, rollout_id)
            assert current is not None
            if resumed_halted and state is RolloutState.RUNNING:
                await self._actions.start_wave(conn, current, current.current_wave, changes)
            if event is RolloutEvent.ABORT:
                await self._actions.abort_rows(conn, current, "aborted by the operator", changes)
        changes.rollout(rollout_id, state=str(state))
        log.info("rollout_operator_event", rollout=rollout_id, action=str(event), state=str(state))
        await self._published(changes)

    # --- late joiners ------------------------------------------------------------------------

    async def consider(self, device_id: str) -> str | None:
        """Let a new or changed device join the rollout it should run; the rollout id."""
        changes = Changes()
        async with self._store.write() as conn:
            if await get_revocation(conn, device_id, lock=True) is not None:
                return None  # out of the fleet: no rollout takes it
            device = await get_device(conn, device_id)
            if device is None:
                return None
            candidates = await rollouts_in(conn, ACCEPTS_LATE_JOINERS)
            chosen = None
            for rollout in reversed(candidates):  # newest first
                if selector_from_json(rollout.selector).matches(device):
                    chosen = rollout
                    break
            if chosen is None:
                return None
            rows = await rows_of_devices(conn, [device_id])
            if any(r.rollout_id == chosen.rollout_id for r in rows):
                return None
            for row in rows:
                other = await get_rollout(conn, row.rollout_id)
                if other is not None and other.order_key > chosen.order_key:
                    return None  # a newer rollout owns the device
            now_ms = self._clock.now_ms()
            last = chosen.wave_count - 1
            targets = await get_models(conn, [device.active_model] if device.active_model else [])
            row = new_row(
                chosen.rollout_id, device, last, targets.get(device.active_model or ""), now_ms
            )
            await self._actions.supersede(conn, [device_id], chosen, changes, waiting_only=True)
            await insert_rows(conn, [row])
            waves = await get_waves(conn, chosen.rollout_id)
            if waves[last].started_ms is not None:
                await self._actions.start_rows(conn, chosen, [row], changes)
        log.info("rollout_late_joiner", rollout=chosen.rollout_id, device=device_id, wave=last)
        await self._published(changes)
        return chosen.rollout_id


def new_row(
    rollout_id: str,
    device: DeviceRecord,
    wave: int,
    previous: ModelRecord | None,
    now_ms: int,
) -> RowRecord:
    return RowRecord(
        rollout_id=rollout_id,
        device_id=device.device_id,
        wave=wave,
        state=INITIAL,
        reason=None,
        previous_model=device.active_model,
        previous_path=None if previous is None else previous.path,
        previous_length=None if previous is None else previous.length,
        previous_sha256=None if previous is None else previous.sha256,
        desired_sequence=None,
        abort_sequence=None,
        pending_since_ms=None,
        last_report_ms=None,
        health_tokens_per_s=None,
        health_ttft_ms=None,
        created_ms=now_ms,
        updated_ms=now_ms,
    )
