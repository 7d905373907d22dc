"""Remote jobs: one request to a device or a selection, with a result per device.

``POST /api/v1/jobs`` stores the job and one ``queued`` row per selected device, each with the
id of the ``job`` envelope it travels in (the device's idempotency key), and commits before
anything is sent. The dispatcher then publishes queued rows (QoS 1, not retained) and marks
them ``sent`` on PUBACK; rows it could not publish stay queued and go out on the next
connection. Publishing a row twice is harmless: the device runs a job id once.

A revoked device is sent nothing once its revocation has committed: each batch is one
transaction, ordered against revocations (:mod:`edgelm_control.store.revocations`) and held
until the broker has answered, so a revocation waits for the batch in flight and then cancels
what is left; a queued row of a revoked device found in a batch is cancelled, not sent.

Results come back on ``dev/{id}/events`` and are stored by the ingest path, which moves the
row to its final state in the same transaction (:func:`~edgelm_control.store.jobs.finish`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from edgelm_control.clock import Clock
from edgelm_control.errors import InvalidRequest, PayloadTooLarge
from edgelm_control.fleet.ports import FleetPublisher, bounded_gather
from edgelm_control.hub import FleetHub
from edgelm_control.metrics import ControlMetrics
from edgelm_control.rollouts.selection import Selector, select_devices, selector_from_json
from edgelm_control.store import Store
from edgelm_control.store.devices import targetable_devices
from edgelm_control.store.ingest import WriteOutcome
from edgelm_control.store.jobs import (
    JobDeviceRecord,
    JobRecord,
    cancel_device_jobs,
    insert_job,
    mark_sent,
    queued,
)
from edgelm_control.store.revocations import lock_revocations, revoked_among
from edgelm_protocol import (
    CONTROL_SENDER,
    Channel,
    Envelope,
    MalformedMessage,
    MessageTooLarge,
    RemoteJob,
    Topic,
    encode,
    new_message_id,
)
from edgelm_protocol.mqtt import MqttError

log = structlog.get_logger(__name__)

JOB_KEYS = (
    "request",
    "selector",
    "priority",
    "ttl_s",
    "max_attempts",
    "metadata",
    "wait_for_model",
)


@dataclass(frozen=True)
class JobRequest:
    selector: Selector
    body: RemoteJob


def parse_job_request(body: object) -> JobRequest:
    """Check ``POST /api/v1/jobs`` with the protocol's own rules for a job body."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("the body must be a JSON object", param="body")
    unknown = sorted(set(body) - set(JOB_KEYS))
    if unknown:
        raise InvalidRequest(
            f"unknown field {unknown[0]!r}; a job takes {', '.join(JOB_KEYS)}", param=unknown[0]
        )
    for required in ("request", "selector"):
        if required not in body:
            raise InvalidRequest(f"{required} is required", param=required)
    selector = selector_from_json(body["selector"])
    document = {
        "request": body["request"],
        "priority": body.get("priority", 0),
        "ttl_s": body.get("ttl_s"),
        "metadata": body.get("metadata"),
        "max_attempts": body.get("max_attempts", 3),
        "wait_for_model": body.get("wait_for_model", False),
    }
    try:
        job = RemoteJob.from_json(document)
        # The device refuses a job over its size limit; so do we, before storing it.
        encode(Envelope(id=new_message_id(), sender=CONTROL_SENDER, ts_ms=0, body=job))
    except MessageTooLarge as exc:
        raise PayloadTooLarge(
            f"a job must be at most {exc.limit_bytes} bytes on the wire, got {exc.size_bytes}",
            limit_bytes=exc.limit_bytes,
            param="request",
        ) from exc
    except MalformedMessage as exc:
        field = (exc.field or "body").removeprefix("body.")
        raise InvalidRequest(exc.reason, param=field) from exc
    return JobRequest(selector=selector, body=job)


class RemoteJobs:
    def __init__(
        self,
        *,
        fleet: str,
        store: Store,
        publisher: FleetPublisher,
        clock: Clock,
        metrics: ControlMetrics,
        hub: FleetHub,
    ) -> None:
        self._fleet = fleet
        self._store = store
        self._publisher = publisher
        self._clock = clock
        self._metrics = metrics
        self._hub = hub
        self._dispatching = asyncio.Lock()

    async def submit(self, request: JobRequest) -> str:
        """Store the job for every selected device; publish it; return the job id."""
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        body = request.body
        async with self._store.write() as conn:
            devices = select_devices(request.selector, await targetable_devices(conn))
            job = JobRecord(
                job_id=job_id,
                request=body.request,
                selector=request.selector.to_json(),
                priority=body.priority,
                ttl_s=body.ttl_s,
                max_attempts=body.max_attempts,
                metadata=body.metadata,
                wait_for_model=body.wait_for_model,
                created_ms=self._clock.now_ms(),
            )
            await insert_job(conn, job, [(d, new_message_id()) for d in devices])
        log.info("job_submitted", job=job_id, devices=len(devices))
        self._hub.publish("job", {"id": job_id, "state": "submitted", "devices": len(devices)})
        await self.dispatch()
        return job_id

    async def dispatch(self) -> int:
        """Publish queued rows until none is left or the broker is gone; how many went."""
        sent = 0
        async with self._dispatching:
            while self._publisher.connected:
                async with self._store.read() as conn:  # nothing to do: no write lane taken
                    if not await queued(conn, limit=1):
                        break
                cancelled: dict[str, list[str]] = {}
                async with self._store.write() as conn:
                    # Held until the broker has answered (see the module's docstring); on
                    # SQLite this holds the write lane for the batch's round trips.
                    await lock_revocations(conn, writer=False)
                    batch = await queued(conn, limit=500)
                    if not batch:
                        break
                    revoked = await revoked_among(conn, [r.device_id for _, r in batch], lock=False)
                    now_ms = self._clock.now_ms()
                    for device_id in sorted(revoked):
                        cancelled[device_id] = await cancel_device_jobs(
                            conn, device_id, now_ms=now_ms
                        )
                    batch = [(j, r) for j, r in batch if r.device_id not in revoked]
                    results = await bounded_gather([self._publish(j, r) for j, r in batch])
                    now_ms = self._clock.now_ms()
                    for (_, row), taken in zip(batch, results, strict=True):
                        if taken:
                            await mark_sent(conn, row.message_id, now_ms)
                            self._metrics.jobs_published.inc()
                for device_id, job_ids in cancelled.items():
                    for job_id in job_ids:
                        self._hub.publish(
                            "job", {"id": job_id, "state": "cancelled", "device": device_id}
                        )
                sent += sum(results)
                if not all(results):
                    break
        return sent

    async def _publish(self, job: JobRecord, row: JobDeviceRecord) -> bool:
        body = RemoteJob(
            request=job.request,
            priority=job.priority,
            ttl_s=job.ttl_s,
            metadata=job.metadata,
            max_attempts=job.max_attempts,
            wait_for_model=job.wait_for_model,
        )
        # The row's message id is the envelope id: the same job is the same message.
        envelope = Envelope(
            id=row.message_id, sender=CONTROL_SENDER, ts_ms=self._clock.now_ms(), body=body
        )
        topic = Topic.for_device(self._fleet, row.device_id, Channel.JOBS)
        try:
            await self._publisher.publish(topic, encode(envelope), retain=False)
        except MqttError as exc:
            log.warning(
                "job_publish_failed",
                job=job.job_id,
                device=row.device_id,
                error=type(exc).__name__,
            )
            return False
        return True

    async def ingested(self, outcome: WriteOutcome) -> None:
        for job_id in sorted(outcome.finished_jobs):
            self._hub.publish("job", {"id": job_id, "state": "result"})
