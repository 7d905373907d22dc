"""JSON Schemas (2020-12, as OpenAPI 3.1 uses) of the API's bodies, for the OpenAPI document.

One entry per shape :mod:`.views` produces and per request body the routes read. The routes
check requests with the same rules in code (the rollouts' and the protocol's validators);
these schemas describe them for clients and generators.
"""

from __future__ import annotations

from typing import Any

from edgelm_control.api.request_schemas import (
    CANARY,
    DEVICE_ID,
    HARDWARE_CLASS,
    PRINTABLE,
    WAVES,
)
from edgelm_control.api.request_schemas import LABELS as LABELS_IN
from edgelm_control.api.request_schemas import MODEL_KEY as MODEL_KEY_IN
from edgelm_control.store.revocations import REASON_MAX_CHARS
from edgelm_protocol.remote_jobs import MAX_TTL_S

Schema = dict[str, Any]

STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
TIME: Schema = {"type": ["string", "null"], "format": "date-time"}
SHA256: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
MODEL_KEY: Schema = {
    "type": "string",
    "pattern": "^[a-z0-9][a-z0-9._-]*@[A-Za-z0-9][A-Za-z0-9._+-]*$",
}
LABELS: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
FREE: Schema = {"type": "object"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(
    properties: dict[str, Schema], *, required: list[str] | None = None, closed: bool = True
) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    schema["required"] = sorted(properties) if required is None else required
    if closed:
        schema["additionalProperties"] = False
    return schema


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def page_of(name: str) -> Schema:
    return obj({"data": {"type": "array", "items": ref(name)}, "next_cursor": nullable(STR)})


TARGET = obj({"path": STR, "length": INT, "sha256": SHA256})
HEALTH = obj({"tokens_per_s": nullable(NUM), "ttft_ms": nullable(NUM)})
PERCENTILES = obj({"p50": nullable(NUM), "p90": nullable(NUM)})

SELECTOR: Schema = {
    "description": "exactly one of devices, labels, class, all",
    "oneOf": [
        obj({"devices": {"type": "array", "items": DEVICE_ID, "minItems": 1}}),
        obj({"labels": {**LABELS_IN, "minProperties": 1}}),
        obj({"class": HARDWARE_CLASS}),
        obj({"all": {"const": True}}),
    ],
}

ERROR = obj(
    {
        "error": obj(
            {
                "message": STR,
                "type": STR,
                "param": nullable(STR),
                "code": nullable(STR),
            },
            required=["message", "type", "param", "code"],
            closed=False,
        )
    }
)

DEVICE_FIELDS: dict[str, Schema] = {
    "id": STR,
    "hardware_class": nullable(STR),
    "labels": LABELS,
    "presence": {"enum": ["online", "offline", "unknown"]},
    "last_seen": TIME,
    "online_since": TIME,
    "first_seen": TIME,
    "registered_at": TIME,
    "agent_version": nullable(STR),
    "active_model": nullable(STR),
    "previous_model": nullable(STR),
    "applied_sequence": INT,
    "revoked_at": {**TIME, "description": "set once the operator revoked it: for good"},
}
DEVICE = obj(DEVICE_FIELDS)

DESIRED = obj(
    {
        "sequence": INT,
        "model": nullable(STR),
        "target": nullable(TARGET),
        "rollout": nullable(STR),
        "issued_at": TIME,
        "expires": TIME,
        "published": BOOL,
    }
)

EVENT = obj(
    {
        "id": STR,
        "seq": INT,
        "kind": STR,
        "model": nullable(STR),
        "desired_sequence": nullable(INT),
        "rollout": nullable(STR),
        "reason": nullable(STR),
        "health": nullable(HEALTH),
        "progress": nullable(obj({"done_bytes": nullable(INT), "total_bytes": INT})),
        "received_at": TIME,
    }
)

TELEMETRY = obj(
    {
        "id": INT,
        "device": STR,
        "received_at": TIME,
        "window_s": NUM,
        "model": nullable(STR),
        "requests": INT,
        "errors": INT,
        "tokens_per_s": PERCENTILES,
        "ttft_ms": PERCENTILES,
        "queue_depth": INT,
        "cpu_percent": nullable(NUM),
        "memory_bytes": nullable(INT),
        "memory_total_bytes": nullable(INT),
        "disk_free_bytes": nullable(INT),
        "temperature_c": nullable(NUM),
    }
)

REVOCATION_FACTS = obj({"revoked_at": TIME, "reason": nullable(STR)})

# A device's fields and the detail's own, in one closed object: an allOf of two closed
# objects would allow no value at all.
DEVICE_DETAIL = obj(
    {
        **DEVICE_FIELDS,
        "reported_state": nullable(FREE),
        "desired": nullable(ref("DesiredState")),
        "rollouts": {
            "type": "array",
            "items": obj({"rollout": STR, "wave": INT, "state": STR, "reason": nullable(STR)}),
        },
        "recent_events": {"type": "array", "items": ref("DeviceEvent")},
        "recent_telemetry": {"type": "array", "items": ref("Telemetry")},
        "revocation": nullable(REVOCATION_FACTS),
    }
)

REVOCATION_REQUEST = obj(
    {
        "reason": nullable(
            {
                "type": "string",
                "minLength": 1,
                "maxLength": REASON_MAX_CHARS,
                "pattern": f"^{PRINTABLE}*$",
                "description": "why, for the log and the device list; no control characters",
            }
        )
    },
    required=[],
)

DEVICE_REVOCATION = obj(
    {
        "device": STR,
        "revoked_at": TIME,
        "reason": nullable(STR),
        "created": {**BOOL, "description": "false: it was revoked before (time, reason kept)"},
        "rollouts": {
            "type": "array",
            "items": STR,
            "description": "rollouts it left now (its rows there are revoked)",
        },
        "jobs_cancelled": {
            "type": "array",
            "items": STR,
            "description": "remote jobs whose row for it was cancelled now",
        },
        "desired_cleared": {
            **BOOL,
            "description": "it had a desired state; the empty retained message deletes it",
        },
    }
)

DEVICE_REGISTRATION = obj(
    {"id": DEVICE_ID, "hardware_class": nullable(HARDWARE_CLASS), "labels": LABELS_IN},
    required=["id"],
)

MODEL = obj(
    {
        "model": MODEL_KEY,
        "name": STR,
        "version": STR,
        "path": STR,
        "length": INT,
        "sha256": SHA256,
        "format": {"enum": ["gguf", "onnx"]},
        "backend": STR,
        "quantization": STR,
        "context_length": INT,
        "min_ram_bytes": INT,
        "custom": FREE,
        "targets_version": INT,
        "added_at": TIME,
    }
)

MODEL_PUSH: Schema = {
    "type": "object",
    "description": (
        "multipart/form-data: part `targets` is the new signed targets metadata (version = "
        "current + 1, signed with the fleet's offline targets key); every other part is a "
        "blob a new target needs (the GGUF file, or an ONNX bundle's bundle.json and each "
        "member), best named by its sha256"
    ),
    "properties": {"targets": {"type": "string", "contentMediaType": "application/json"}},
    "required": ["targets"],
    "additionalProperties": {"type": "string", "contentMediaType": "application/octet-stream"},
}

MODEL_PUSHED = obj({"added": {"type": "array", "items": ref("Model")}, "targets_version": INT})

ROLLOUT_REQUEST = obj(
    {
        "model": MODEL_KEY_IN,
        "selector": ref("Selector"),
        "canary": CANARY,
        "waves": WAVES,
        "success_threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "failure_threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "on_failure": {"enum": ["pause", "abort"]},
        "health_margin": nullable({"type": "number", "minimum": 0, "exclusiveMaximum": 1}),
        "device_timeout_s": {"type": "integer", "minimum": 1},
        "pending_expiry_s": {"type": "integer", "minimum": 1},
        "pause_between_waves": {
            "type": "boolean",
            "description": "pause after each passed wave but the last; resume starts the next",
        },
    },
    required=["model", "selector"],
)
ROLLOUT_REQUEST["not"] = {"required": ["canary", "waves"], "description": "canary or waves"}

ROLLOUT_STATES = ["running", "paused", "halted", "completed", "aborted", "failed"]

ROLLOUT_SUMMARY_FIELDS: dict[str, Schema] = {
    "id": STR,
    "model": MODEL_KEY,
    "state": {"enum": ROLLOUT_STATES},
    "current_wave": INT,
    "wave_count": INT,
    "selector": ref("Selector"),
    "device_count": INT,
    "counts": {"type": "object", "additionalProperties": INT},
    "created_at": TIME,
    "updated_at": TIME,
    "ended_at": TIME,
}
ROLLOUT_SUMMARY = obj(ROLLOUT_SUMMARY_FIELDS)

WAVE = obj(
    {
        "index": INT,
        "devices": {"type": "array", "items": STR},
        "started_at": TIME,
        "decided_at": TIME,
        "verdict": nullable({"enum": ["passed", "failed", "accepted"]}),
        "code": nullable(STR),
        "reason": nullable(STR),
        "tally": nullable(FREE),
    }
)

ROW = obj(
    {
        "id": STR,
        "wave": INT,
        "state": STR,
        "reason": nullable(STR),
        "previous_model": nullable(STR),
        "desired_sequence": nullable(INT),
        "health": nullable(HEALTH),
        "updated_at": TIME,
    }
)

# The summary's fields and the detail's own in one closed object, as DEVICE_DETAIL.
ROLLOUT = obj(
    {
        **ROLLOUT_SUMMARY_FIELDS,
        "target": TARGET,
        "settings": FREE,
        "baselines": {"type": "object", "additionalProperties": HEALTH},
        "waves": {"type": "array", "items": ref("Wave")},
        "devices": {"type": "array", "items": ref("RolloutDevice")},
        "pending": {"type": "array", "items": STR},
    }
)

JOB_REQUEST = obj(
    {
        "request": {"type": "object", "description": "an OpenAI chat or completion body"},
        "selector": ref("Selector"),
        "priority": {"type": "integer", "minimum": -100, "maximum": 100},
        "ttl_s": nullable({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TTL_S}),
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 10},
        "metadata": nullable(FREE),
        "wait_for_model": BOOL,
    },
    required=["request", "selector"],
)

JOB_STATES = ["queued", "sent", "succeeded", "failed", "dead", "cancelled", "expired"]

JOB = obj(
    {
        "id": STR,
        "created_at": TIME,
        "selector": ref("Selector"),
        "request": FREE,
        "priority": INT,
        "ttl_s": nullable(NUM),
        "max_attempts": INT,
        "metadata": nullable(FREE),
        "wait_for_model": BOOL,
        "counts": {"type": "object", "additionalProperties": INT},
        "devices": {
            "type": "array",
            "items": obj(
                {
                    "device": STR,
                    "state": {"enum": JOB_STATES},
                    "message_id": STR,
                    "sent_at": TIME,
                    "finished_at": TIME,
                    "result": nullable(FREE),
                    "error": nullable(FREE),
                    "metadata": nullable(FREE),
                }
            ),
        },
    }
)

AGGREGATE = obj(
    {
        "group": {"type": "object", "additionalProperties": nullable(STR)},
        "count": INT,
        "requests": INT,
        "errors": INT,
        "tokens_per_s_p50": nullable(NUM),
        "ttft_ms_p50": nullable(NUM),
    }
)

AGGREGATES = obj({"data": {"type": "array", "items": ref("TelemetryAggregate")}, "truncated": BOOL})

STATUS = obj({"status": STR}, closed=False)

COMPONENTS: dict[str, Schema] = {
    "Error": ERROR,
    "Selector": SELECTOR,
    "Device": DEVICE,
    "DeviceDetail": DEVICE_DETAIL,
    "DeviceRegistration": DEVICE_REGISTRATION,
    "DeviceRevocationRequest": REVOCATION_REQUEST,
    "DeviceRevocation": DEVICE_REVOCATION,
    "DesiredState": DESIRED,
    "DeviceEvent": EVENT,
    "Telemetry": TELEMETRY,
    "TelemetryAggregate": AGGREGATE,
    "TelemetryAggregates": AGGREGATES,
    "Model": MODEL,
    "ModelPush": MODEL_PUSH,
    "ModelPushed": MODEL_PUSHED,
    "RolloutRequest": ROLLOUT_REQUEST,
    "RolloutSummary": ROLLOUT_SUMMARY,
    "Rollout": ROLLOUT,
    "Wave": WAVE,
    "RolloutDevice": ROW,
    "JobRequest": JOB_REQUEST,
    "Job": JOB,
    "Status": STATUS,
    "DevicePage": page_of("Device"),
    "ModelPage": page_of("Model"),
    "RolloutPage": page_of("RolloutSummary"),
    "JobPage": page_of("Job"),
    "TelemetryPage": page_of("Telemetry"),
}
