"""Stored records as the REST API shows them. Pure: records in, JSON-ready dicts out.

Times are RFC 3339 strings in UTC with milliseconds (``2026-11-28T01:05:57.123Z``), named
without a unit (``last_seen``, ``created_at``): readable by a person and by every JSON
client, unlike bare integers whose unit must be guessed. :mod:`.schemas` describes each shape
for the OpenAPI document.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edgelm_control.rollouts.device_states import DeviceState
from edgelm_control.store.desired import DesiredRecord
from edgelm_control.store.devices import DeviceRecord
from edgelm_control.store.events import EventRecord
from edgelm_control.store.jobs import JobDeviceRecord, JobRecord, JobResultRecord
from edgelm_control.store.models import ModelRecord
from edgelm_control.store.revocations import Revocation
from edgelm_control.store.rollouts import RolloutRecord, RowRecord, WaveRecord, baselines_to_json
from edgelm_control.store.telemetry import Aggregate, TelemetryRecord


def when(ms: int | None) -> str | None:
    if ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def when_s(s: int | None) -> str | None:
    return None if s is None else when(s * 1000)


def device_view(device: DeviceRecord, revocation: Revocation | None = None) -> dict[str, Any]:
    return {
        "id": device.device_id,
        "hardware_class": device.hardware_class,
        "labels": dict(device.labels),
        "presence": device.presence,
        "last_seen": when(device.last_seen_ms),
        "online_since": when(device.online_since_ms) if device.online else None,
        "first_seen": when(device.first_seen_ms),
        "registered_at": when(device.registered_ms),
        "agent_version": device.agent_version,
        "active_model": device.active_model,
        "previous_model": device.previous_model,
        "applied_sequence": device.applied_sequence,
        "revoked_at": None if revocation is None else when(revocation.revoked_ms),
    }


def revocation_view(revocation: Revocation | None) -> dict[str, Any] | None:
    if revocation is None:
        return None
    return {"revoked_at": when(revocation.revoked_ms), "reason": revocation.reason}


def desired_view(desired: DesiredRecord | None) -> dict[str, Any] | None:
    if desired is None:
        return None
    target = None
    if desired.target is not None:
        path, length, sha256 = desired.target
        target = {"path": path, "length": length, "sha256": sha256}
    return {
        "sequence": desired.sequence,
        "model": desired.model,
        "target": target,
        "rollout": desired.rollout_id,
        "issued_at": when_s(desired.issued_at_s),
        "expires": when_s(desired.expires_s),
        "published": desired.published,
    }


def event_view(event: EventRecord) -> dict[str, Any]:
    return {
        "id": event.message_id,
        "seq": event.seq,
        "kind": event.kind,
        "model": event.model,
        "desired_sequence": event.desired_sequence,
        "rollout": event.rollout_id,
        "reason": event.reason,
        "health": None
        if event.health_tokens_per_s is None and event.health_ttft_ms is None
        else {"tokens_per_s": event.health_tokens_per_s, "ttft_ms": event.health_ttft_ms},
        "progress": None
        if event.progress_total_bytes is None
        else {"done_bytes": event.progress_done_bytes, "total_bytes": event.progress_total_bytes},
        "received_at": when(event.received_ms),
    }


def telemetry_view(row: TelemetryRecord) -> dict[str, Any]:
    return {
        "id": row.id,
        "device": row.device_id,
        "received_at": when(row.received_ms),
        "window_s": row.window_s,
        "model": row.model,
        "requests": row.requests,
        "errors": row.errors,
        "tokens_per_s": {"p50": row.tokens_per_s_p50, "p90": row.tokens_per_s_p90},
        "ttft_ms": {"p50": row.ttft_ms_p50, "p90": row.ttft_ms_p90},
        "queue_depth": row.queue_depth,
        "cpu_percent": row.cpu_percent,
        "memory_bytes": row.memory_bytes,
        "memory_total_bytes": row.memory_total_bytes,
        "disk_free_bytes": row.disk_free_bytes,
        "temperature_c": row.temperature_c,
    }


def aggregate_view(aggregate: Aggregate) -> dict[str, Any]:
    return {
        "group": aggregate.group,
        "count": aggregate.count,
        "requests": aggregate.requests,
        "errors": aggregate.errors,
        "tokens_per_s_p50": aggregate.tokens_per_s_p50,
        "ttft_ms_p50": aggregate.ttft_ms_p50,
    }


def model_view(model: ModelRecord) -> dict[str, Any]:
    return {
        "model": model.model,
        "name": model.name,
        "version": model.version,
        "path": model.path,
        "length": model.length,
        "sha256": model.sha256,
        "format": model.format,
        "backend": model.backend,
        "quantization": model.quantization,
        "context_length": model.context_length,
        "min_ram_bytes": model.min_ram_bytes,
        "custom": model.custom,
        "targets_version": model.targets_version,
        "added_at": when(model.added_ms),
    }


def rollout_summary(rollout: RolloutRecord, counts: Mapping[str, int]) -> dict[str, Any]:
    return {
        "id": rollout.rollout_id,
        "model": rollout.model,
        "state": str(rollout.state),
        "current_wave": rollout.current_wave,
        "wave_count": rollout.wave_count,
        "selector": rollout.selector,
        "device_count": sum(counts.values()),
        "counts": dict(sorted(counts.items())),
        "created_at": when(rollout.created_ms),
        "updated_at": when(rollout.updated_ms),
        "ended_at": when(rollout.ended_ms),
    }


def rollout_detail(
    rollout: RolloutRecord, waves: Sequence[WaveRecord], rows: Sequence[RowRecord]
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row.state)] = counts.get(str(row.state), 0) + 1
    view = rollout_summary(rollout, counts)
    view |= {
        "target": {
            "path": rollout.target_path,
            "length": rollout.target_length,
            "sha256": rollout.target_sha256,
        },
        "settings": rollout.settings.to_json(),
        "baselines": baselines_to_json(rollout.baselines),
        "waves": [wave_view(w, [r for r in rows if r.wave == w.wave]) for w in waves],
        "devices": [row_view(r) for r in rows],
        "pending": sorted(r.device_id for r in rows if r.state is DeviceState.PENDING),
    }
    return view


def wave_view(wave: WaveRecord, rows: Iterable[RowRecord]) -> dict[str, Any]:
    return {
        "index": wave.wave,
        "devices": sorted(r.device_id for r in rows),
        "started_at": when(wave.started_ms),
        "decided_at": when(wave.decided_ms),
        "verdict": wave.verdict,
        "code": wave.code,
        "reason": wave.reason,
        "tally": wave.tally,
    }


def row_view(row: RowRecord) -> dict[str, Any]:
    health = None
    if row.health_tokens_per_s is not None or row.health_ttft_ms is not None:
        health = {"tokens_per_s": row.health_tokens_per_s, "ttft_ms": row.health_ttft_ms}
    return {
        "id": row.device_id,
        "wave": row.wave,
        "state": str(row.state),
        "reason": row.reason,
        "previous_model": row.previous_model,
        "desired_sequence": row.desired_sequence,
        "health": health,
        "updated_at": when(row.updated_ms),
    }


def job_view(
    job: JobRecord,
    rows: Sequence[JobDeviceRecord],
    results: Mapping[str, JobResultRecord],
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    devices = []
    for row in rows:
        counts[str(row.state)] = counts.get(str(row.state), 0) + 1
        result = results.get(row.result_message_id or "")
        devices.append(
            {
                "device": row.device_id,
                "state": str(row.state),
                "message_id": row.message_id,
                "sent_at": when(row.sent_ms),
                "finished_at": when(row.finished_ms),
                "result": None if result is None else result.result,
                "error": None if result is None else result.error,
                "metadata": None if result is None else result.metadata,
            }
        )
    return {
        "id": job.job_id,
        "created_at": when(job.created_ms),
        "selector": job.selector,
        "request": job.request,
        "priority": job.priority,
        "ttl_s": job.ttl_s,
        "max_attempts": job.max_attempts,
        "metadata": job.metadata,
        "wait_for_model": job.wait_for_model,
        "counts": dict(sorted(counts.items())),
        "devices": devices,
    }
