"""Measure how many telemetry messages per second the control plane stores (not a test).

Run from the repository root::

    .venv/bin/python -m tests.integration.control.telemetry_rate [--messages 30000] [--runs 3]

Two measurements, each on SQLite and on PostgreSQL, each the median of ``--runs`` runs:

* **end to end**: ``edgelm control run`` as its own process drains, through a real
  Mosquitto, a backlog of 100 simulated devices' telemetry (QoS 1, manual acks, stored in
  batches, then acknowledged); the rate is rows over the time from the first row stored
  to the last. The load is published while the control plane is away, so the load
  generator does not share the two cores with it.
* **store path**: in one process, what the ingest loop does per batch: decode each
  envelope, build the rows, one transaction per 500 messages. No broker: this is the
  ceiling the store sets.

It prints a table. Nothing here asserts: the budget (5,000 messages/s on SQLite) is read
off the table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import func, select

from edgelm_control.fleet.batch import Accepted, build_batch
from edgelm_control.store import Store
from edgelm_control.store.ingest import write_batch
from edgelm_control.store.schema import telemetry
from edgelm_protocol import Percentiles, Telemetry, Topic, decode, encode, new_envelope
from tests.integration.control.conftest import postgres_database
from tests.integration.control.control_process import ControlProcess, write_config
from tests.integration.control.fleet import make_fleet
from tests.mosquitto import Mosquitto

DEVICES = 100
BATCH = 500


def body(i: int) -> Telemetry:
    return Telemetry(
        window_s=10.0,
        model="smollm2@1.0",
        requests=i % 7,
        errors=0,
        tokens_per_s=Percentiles(40.0 + i % 10, 50.0),
        ttft_ms=Percentiles(90.0, 120.0),
        queue_depth=i % 3,
        cpu_percent=12.5,
        memory_bytes=1 << 28,
        memory_total_bytes=4 << 30,
        disk_free_bytes=10 << 30,
        temperature_c=45.0,
    )


def payloads(count: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(count):
        device = f"dev-{i % DEVICES:04d}"
        envelope = new_envelope(body(i), sender=device, ts_ms=int(time.time() * 1000))
        out.append((Topic.for_type("acme", device, envelope.type).value, encode(envelope)))
    return out


async def count_rows(store: Store) -> int:
    async with store.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(telemetry))).scalar_one())


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> float:
    """Publish at QoS 1 from a few paho clients in parallel; return the start time."""
    clients = []
    for n in range(4):
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"loadgen-{n}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.max_inflight_messages_set(200)
        client.max_queued_messages_set(0)
        client.connect("127.0.0.1", port)
        client.loop_start()
        clients.append(client)
    started = time.perf_counter()

    def run(client: paho.Client, part: list[tuple[str, bytes]]) -> None:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in part]
        for info in infos:
            info.wait_for_publish(60)

    threads = [
        threading.Thread(target=run, args=(c, messages[i :: len(clients)]))
        for i, c in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        client.loop_stop()
        client.disconnect()
    return started


async def end_to_end(db_url: str, messages: int) -> float:
    """The control plane drains a backlog the broker holds for its session.

    The control plane connects once (its persistent session subscribes), stops, and the
    load is published while it is away; then it starts again, and the rate is the stored
    rows over the time between the first and the last row stored (``received_ms``), so
    neither its start-up nor the load generator's CPU is counted.
    """
    with tempfile.TemporaryDirectory(prefix="edgelm-rate-") as tmp:
        root = Path(tmp)
        broker = Mosquitto(root / "broker")
        # The broker must hold the whole backlog for the offline session (default: 1,000).
        with broker.config_path.open("a") as config_file:
            config_file.write("max_queued_messages 0\n")
        broker.start()
        fleet = make_fleet(root / "fleet")
        config = write_config(
            fleet,
            broker.port,
            db=db_url,
            log_level="warning",
            engine_tick_s=2.0,
            ingest_decode_workers=1,
            ingest_flush_interval_s=0.05,
        )
        process = ControlProcess(config, root / "first.log")
        try:
            await asyncio.to_thread(process.wait_ready)
            await asyncio.to_thread(process.terminate)
            await asyncio.to_thread(publish_all, broker.port, payloads(messages))
            process = ControlProcess(config, root / "second.log")
            store = await Store.open(db_url, migrate=False)
            try:
                while await count_rows(store) < messages:
                    await asyncio.sleep(0.05)
                async with store.read() as conn:
                    first, last = (
                        await conn.execute(
                            select(
                                func.min(telemetry.c.received_ms), func.max(telemetry.c.received_ms)
                            )
                        )
                    ).one()
            finally:
                await store.close()
            return (messages - 1) / ((int(last) - int(first)) / 1000)
        finally:
            process.terminate()
            broker.stop()


async def store_path(db_url: str, messages: int) -> float:
    store = await Store.open(db_url)
    raw = payloads(messages)
    started = time.perf_counter()
    for start in range(0, messages, BATCH):
        items = []
        for topic, payload in raw[start : start + BATCH]:
            envelope = decode(topic, payload)
            items.append(Accepted(envelope.sender, envelope))
        now = int(time.time() * 1000)
        async with store.write() as conn:
            await write_batch(conn, build_batch(items, now), now)
    elapsed = time.perf_counter() - started
    assert await count_rows(store) == messages
    await store.close()
    return messages / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for backend in ("sqlite", "postgresql"):
        for name, measure in (("end to end", end_to_end), ("store path", store_path)):
            rates = []
            for _ in range(args.runs):
                if backend == "sqlite":
                    with tempfile.TemporaryDirectory(prefix="edgelm-rate-db-") as tmp:
                        rates.append(await measure(f"sqlite:///{tmp}/control.db", args.messages))
                else:
                    async with postgres_database() as url:
                        rates.append(await measure(url, args.messages))
            rows.append((backend, name, rates))
    print(f"\ntelemetry stored per second ({args.messages} messages per run, {args.runs} runs)")
    print(f"{'database':<12}{'path':<13}{'median':>10}   runs")
    for backend, name, rates in rows:
        shown = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"{backend:<12}{name:<13}{statistics.median(rates):>10,.0f}   {shown}")


if __name__ == "__main__":
    asyncio.run(main())
