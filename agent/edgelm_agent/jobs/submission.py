"""A job submission, checked: the wire form of ``POST /v1/jobs`` and of a fleet's remote job.

Pure: a JSON object in, a :class:`~edgelm_agent.jobs.store.JobSpec` or an error naming the
field out. The request inside is checked as its endpoint would check it (400 now, not at run
time), with the same parser the endpoint uses.
"""

from __future__ import annotations

import json
from typing import Any

from edgelm_agent.errors import InvalidRequest, shown
from edgelm_agent.generation.openai_schema import finite_number, parse_chat, parse_completion
from edgelm_agent.generation.prepare import kind_of
from edgelm_agent.jobs import store
from edgelm_agent.residency import parse_keep_alive

MAX_METADATA_BYTES = 16 << 10
MAX_KEY_CHARS = 128
#: A job may wait up to ten years; a deadline past the year 9999 is no date at all.
MAX_TTL_S = 10 * 366 * 86400.0
MAX_DEADLINE = 253_402_300_799.0  # 9999-12-31T23:59:59Z


def parse_job(body: dict[str, Any], now: float) -> store.JobSpec:
    """Validate a submission; every fault names its field."""
    request = body.get("request")
    if not isinstance(request, dict):
        raise InvalidRequest(
            "'request' must be a chat or completion request object", param="request"
        )
    if request.get("stream"):
        raise InvalidRequest("jobs cannot stream; leave 'stream' out", param="request.stream")
    kind = kind_of(request)
    (parse_chat if kind == "chat" else parse_completion)(request)  # 400 now, not at run time
    if "keep_alive" in request:  # how long the job's model stays loaded after it
        parse_keep_alive(request["keep_alive"])
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -100 <= priority <= 100:
        raise InvalidRequest(
            f"'priority' must be an integer from -100 to 100, got {shown(priority)}",
            param="priority",
        )
    deadline = _deadline(body, now)
    key = body.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS):
        raise InvalidRequest(
            f"'idempotency_key' must be 1-{MAX_KEY_CHARS} characters", param="idempotency_key"
        )
    metadata = body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or _json_bytes(metadata) > MAX_METADATA_BYTES
    ):
        raise InvalidRequest(
            f"'metadata' must be an object of at most {MAX_METADATA_BYTES} bytes of JSON",
            param="metadata",
        )
    report = body.get("report", "local")
    if report not in ("local", "upstream"):
        raise InvalidRequest("'report' must be 'local' or 'upstream'", param="report")
    wait_for_model = body.get("wait_for_model", False)
    if not isinstance(wait_for_model, bool):
        raise InvalidRequest("'wait_for_model' must be true or false", param="wait_for_model")
    attempts = body.get("max_attempts", 3)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
        raise InvalidRequest(
            f"'max_attempts' must be an integer from 1 to 10, got {shown(attempts)}",
            param="max_attempts",
        )
    return store.JobSpec(
        kind=kind,
        request=request,
        priority=priority,
        deadline=deadline,
        idempotency_key=key,
        metadata=metadata,
        report=report,
        max_attempts=attempts,
        wait_for_model=wait_for_model,
    )


def _json_bytes(value: Any) -> int:
    """Size as stored: UTF-8 bytes, so non-Latin text is not counted six times over as
    ``\\uXXXX`` escapes."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def _deadline(body: dict[str, Any], now: float) -> float | None:
    ttl, deadline = body.get("ttl_s"), body.get("deadline")
    if ttl is not None and deadline is not None:
        raise InvalidRequest("give 'ttl_s' or 'deadline', not both", param="ttl_s")
    if ttl is not None:
        seconds = finite_number(ttl)
        if seconds is None or not 0 < seconds <= MAX_TTL_S:
            raise InvalidRequest(
                f"'ttl_s' must be a number of seconds from 0 to {MAX_TTL_S:.0f}, got {shown(ttl)}",
                param="ttl_s",
            )
        return now + seconds
    if deadline is not None:
        when = finite_number(deadline)
        if when is None or not 0 < when <= MAX_DEADLINE:
            raise InvalidRequest(
                f"'deadline' must be a Unix time before the year 10000, got {shown(deadline)}",
                param="deadline",
            )
        if when <= now:
            raise InvalidRequest("'deadline' is in the past", param="deadline")
        return when
    return None
