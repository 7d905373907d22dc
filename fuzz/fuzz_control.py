"""atheris harness for the control plane's receiver, ``Ingestor.accept`` (and the telemetry
decoder behind it). Not run by ``make test``.

::

    .venv/bin/python fuzz/fuzz_control.py -max_total_time=180 fuzz/corpus-control

The first byte of each input picks a topic, the rest is the payload. Any exception, or a
message neither refused once (counted, acknowledged) nor queued, is a crash.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import atheris
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from edgelm_control.clock import ManualClock
    from edgelm_control.fleet.batch import build_batch
    from edgelm_control.fleet.ingest import Ingestor
    from edgelm_control.metrics import ControlMetrics
    from edgelm_protocol import decode  # noqa: F401  (instrumented for coverage)
    from edgelm_protocol.mqtt.messages import InboundMessage

from fuzz.common import FLEET, split, write_seeds


class Link:
    fleet = FLEET

    def __init__(self) -> None:
        self.acked = 0

    def ack(self, message: InboundMessage) -> bool:
        self.acked += 1
        return True


LOOP = asyncio.new_event_loop()
LINK = Link()
METRICS = ControlMetrics()
INGEST = Ingestor(
    store=None,  # type: ignore[arg-type]
    link=LINK,  # type: ignore[arg-type]
    clock=ManualClock(),
    metrics=METRICS,
    batch_max=100,
    flush_interval_s=0,
)


def refused_total() -> float:
    return sum(
        sample.value
        for metric in METRICS.refused.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def test_one_input(data: bytes) -> None:
    topic, payload = split(data)
    acked, refused, queued = LINK.acked, refused_total(), len(INGEST._pending)
    INGEST.accept(InboundMessage(topic, payload, qos=1))
    if INGEST._raw:
        LOOP.run_until_complete(INGEST._decode_waiting())
    new_refusals = refused_total() - refused
    if new_refusals:
        assert new_refusals == 1
        assert LINK.acked == acked + 1
        assert len(INGEST._pending) == queued
    else:  # queued, or a repeated id acknowledged as a duplicate
        assert len(INGEST._pending) + (LINK.acked - acked) == queued + 1
    build_batch([pending.accepted for pending in INGEST._pending], 1)
    INGEST._pending.clear()


def main() -> None:
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # quiet
    corpus = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    if corpus:
        write_seeds(Path(corpus[0]))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
