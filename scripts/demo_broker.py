"""An embedded MQTT broker for ``make demo`` where Mosquitto is not installed. FOR A DEMO ONLY.

amqtt is a pure-Python broker: MQTT 3.1.1 only (so the demo's broker URL carries
``?protocol=3.1.1``, and shared subscriptions are not available), no persistence across
restarts, no ACLs, anonymous clients, and far below Mosquitto's throughput. A real site runs
Mosquitto (or an MQTT cluster such as EMQX) and MQTT 5.

``python scripts/demo_broker.py PORT [--host 127.0.0.1]``; SIGTERM or Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

SHUTDOWN_TIMEOUT_S = 10.0


async def serve(host: str, port: int) -> None:
    try:
        from amqtt.broker import Broker
    except ImportError:
        raise SystemExit(
            "demo: neither Mosquitto nor amqtt is installed; `apt install mosquitto` "
            "(a real broker) or `pip install amqtt` (a demo one)"
        ) from None
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Only anonymous authentication: none of amqtt's event, packet or $SYS plugins.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"amqtt {_version()} listening on {host}:{port}: MQTT 3.1.1, FOR A DEMO ONLY",
        flush=True,
    )
    await stop.wait()
    try:
        async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
            await broker.shutdown()
    except TimeoutError:
        print(f"amqtt did not shut down within {SHUTDOWN_TIMEOUT_S:.0f} s", file=sys.stderr)
    print("amqtt stopped", flush=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amqtt")
    except PackageNotFoundError:
        return "(unknown version)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    # amqtt logs through `logging`; its warnings and errors go to stderr (the demo's broker.log).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
