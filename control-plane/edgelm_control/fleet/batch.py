"""Turning a batch of accepted messages into rows. Pure: envelopes in, rows and reports out.

The ingest loop collects decoded envelopes and hands them here before one store transaction:

* ``telemetry`` becomes rows for one ``executemany``;
* ``event`` and ``job_result`` become rows keyed by message id (stored once), and their ids
  are what the control plane acknowledges end to end once the transaction commits;
* ``presence`` and ``state`` fold into one :class:`DeviceReport` per device (the presences
  in arrival order, the last state), so a batch touches each device row once;
* every message, whatever its type, says the device was seen.

The store drops a revoked device's rows from the batch (:meth:`IngestBatch.without`) inside
the transaction that writes it, so nothing a revoked device sent is stored, whenever the
revocation landed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edgelm_control.fleet.decoder import (
    TELEMETRY_FIELDS,
    DecodedTelemetry,
    TelemetryValues,
    telemetry_values,
)
from edgelm_control.store.devices import DeviceReport
from edgelm_control.store.sql import dumps
from edgelm_protocol import (
    Envelope,
    Event,
    JobResult,
    Presence,
    ReportedState,
    Telemetry,
)


@dataclass(frozen=True)
class Accepted:
    """A message that passed :func:`edgelm_protocol.decode`, with its device."""

    device_id: str
    envelope: Envelope

    @property
    def message_id(self) -> str:
        return self.envelope.id


Item = Accepted | DecodedTelemetry  # telemetry may arrive decoded to a row already


@dataclass
class IngestBatch:
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    reports: list[DeviceReport] = field(default_factory=list)
    #: Per device, the ids of events and results to acknowledge once stored.
    acks: dict[str, list[str]] = field(default_factory=dict)
    #: Every device with a message in the batch, whatever its type.
    devices: frozenset[str] = frozenset()

    def without(self, device_ids: frozenset[str]) -> IngestBatch:
        """The batch without anything from ``device_ids`` (a copy; the batch is unchanged)."""
        if not device_ids & self.devices:
            return self
        return replace(
            self,
            telemetry=[r for r in self.telemetry if r["device_id"] not in device_ids],
            events=[r for r in self.events if r["device_id"] not in device_ids],
            results=[r for r in self.results if r["device_id"] not in device_ids],
            reports=[r for r in self.reports if r.device_id not in device_ids],
            acks={d: ids for d, ids in self.acks.items() if d not in device_ids},
            devices=self.devices - device_ids,
        )


def telemetry_row(device_id: str, values: TelemetryValues, now_ms: int) -> dict[str, Any]:
    row = dict(zip(TELEMETRY_FIELDS, values, strict=True))
    row["device_id"] = device_id
    row["received_ms"] = now_ms
    return row


def event_row(device_id: str, envelope: Envelope, body: Event, now_ms: int) -> dict[str, Any]:
    return {
        "message_id": envelope.id,
        "device_id": device_id,
        "seq": body.seq,
        "kind": str(body.kind),
        "model": body.model,
        "desired_sequence": body.desired_sequence,
        "rollout_id": body.rollout,
        "reason": body.reason,
        "health_tokens_per_s": None if body.health is None else body.health.tokens_per_s,
        "health_ttft_ms": None if body.health is None else body.health.ttft_ms,
        "progress_done_bytes": None if body.progress is None else body.progress.done_bytes,
        "progress_total_bytes": None if body.progress is None else body.progress.total_bytes,
        "sent_ms": envelope.ts_ms,
        "received_ms": now_ms,
        "processed_ms": None,
    }


def result_row(device_id: str, envelope: Envelope, body: JobResult, now_ms: int) -> dict[str, Any]:
    return {
        "message_id": envelope.id,
        "job_message_id": body.job_id,
        "device_id": device_id,
        "state": str(body.state),
        "metadata": None if body.metadata is None else dumps(body.metadata),
        "result": None if body.result is None else dumps(body.result),
        "error": None if body.error is None else dumps(body.error.to_json()),
        "sent_ms": envelope.ts_ms,
        "received_ms": now_ms,
    }


def build_batch(items: Sequence[Item], now_ms: int) -> IngestBatch:
    batch = IngestBatch()
    seen: dict[str, int] = {}
    presences: dict[str, list[tuple[Any, str]]] = {}
    states: dict[str, ReportedState] = {}
    for item in items:
        seen[item.device_id] = now_ms
        if isinstance(item, DecodedTelemetry):
            batch.telemetry.append(telemetry_row(item.device_id, item.values, now_ms))
            continue
        device, envelope, body = item.device_id, item.envelope, item.envelope.body
        if isinstance(body, Telemetry):
            values = telemetry_values(envelope.ts_ms, body)
            batch.telemetry.append(telemetry_row(device, values, now_ms))
        elif isinstance(body, Event):
            batch.events.append(event_row(device, envelope, body, now_ms))
            batch.acks.setdefault(device, []).append(envelope.id)
        elif isinstance(body, JobResult):
            batch.results.append(result_row(device, envelope, body, now_ms))
            batch.acks.setdefault(device, []).append(envelope.id)
        elif isinstance(body, Presence):
            presences.setdefault(device, []).append((body.status, body.agent_version))
        elif isinstance(body, ReportedState):
            states[device] = body
    batch.reports = [
        DeviceReport(
            device_id=device,
            seen_ms=seen_ms,
            presences=tuple(presences.get(device, ())),
            state=states.get(device),
        )
        for device, seen_ms in seen.items()
    ]
    batch.devices = frozenset(seen)
    return batch
