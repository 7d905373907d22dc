"""Decoding telemetry in worker processes, so the event loop keeps up with the broker.

Telemetry is most of what devices send, and the strict decode (:func:`edgelm_protocol.decode`:
size, strict JSON, envelope, schema) is most of what storing it costs. The event loop has
other work per message that cannot move (reading MQTT packets, acknowledging them), so
telemetry payloads go to a process pool in batches, and come back as plain tuples, cheap to
pass between processes: either a row to store or the refusal to log. The checks are
exactly the same code; only the process differs.

Other message types are few and feed the rollout engine in order, so they are decoded in
the event loop as they arrive. With ``workers = 0`` telemetry is too (tests, small sites).
If a worker dies the pool is rebuilt and the batch decoded in the loop: nothing is lost.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import structlog

from edgelm_protocol import MessageRefused, Telemetry, Topic, decode

log = structlog.get_logger(__name__)

TELEMETRY_FIELDS = (
    "sent_ms", "window_s", "model", "requests", "errors", "tokens_per_s_p50",
    "tokens_per_s_p90", "ttft_ms_p50", "ttft_ms_p90", "queue_depth", "cpu_percent",
    "memory_bytes", "memory_total_bytes", "disk_free_bytes", "temperature_c",
)  # fmt: skip

TelemetryValues = tuple[object, ...]  # in TELEMETRY_FIELDS order


@dataclass(frozen=True)
class DecodedTelemetry:
    device_id: str
    message_id: str
    values: TelemetryValues


@dataclass(frozen=True)
class Refusal:
    code: str
    topic: str
    reason: str
    size_bytes: int


def telemetry_values(sent_ms: int, body: Telemetry) -> TelemetryValues:
    return (
        sent_ms,
        body.window_s,
        body.model,
        body.requests,
        body.errors,
        body.tokens_per_s.p50,
        body.tokens_per_s.p90,
        body.ttft_ms.p50,
        body.ttft_ms.p90,
        body.queue_depth,
        body.cpu_percent,
        body.memory_bytes,
        body.memory_total_bytes,
        body.disk_free_bytes,
        body.temperature_c,
    )


def decode_telemetry(topic: str, payload: bytes) -> DecodedTelemetry | Refusal:
    """One telemetry message: its row, or why it is refused. Pure; runs in a worker."""
    try:
        parsed = Topic.parse(topic)
        envelope = decode(parsed, payload)
    except MessageRefused as exc:
        return Refusal(exc.code, exc.topic or ascii(topic)[:200], exc.reason[:500], len(payload))
    body = envelope.body
    if not isinstance(body, Telemetry) or parsed.device is None:  # the topic decides: not here
        return Refusal("topic_mismatch", topic, "not telemetry", len(payload))
    return DecodedTelemetry(parsed.device, envelope.id, telemetry_values(envelope.ts_ms, body))


def decode_telemetry_batch(
    items: Sequence[tuple[str, bytes]],
) -> list[DecodedTelemetry | Refusal]:
    return [decode_telemetry(topic, payload) for topic, payload in items]


class TelemetryDecoder:
    """Decodes batches of telemetry in ``workers`` processes (0: in the calling loop)."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # forkserver: never fork the event loop's process (threads, open sockets).
            self._pool = ProcessPoolExecutor(
                max_workers=self._workers, mp_context=multiprocessing.get_context("forkserver")
            )
        return self._pool

    async def decode(self, items: Sequence[tuple[str, bytes]]) -> list[DecodedTelemetry | Refusal]:
        if self._workers == 0 or len(items) < 2:
            return decode_telemetry_batch(items)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor(), decode_telemetry_batch, list(items)
            )
        except BrokenProcessPool:
            log.warning("telemetry_decoder_restarted", messages=len(items))
            self.close()
            return decode_telemetry_batch(items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
