"""The composition root: the one place that builds the control plane from its configuration.

:class:`ControlService` opens the store (migrating it), loads the tokens and the director
key, indexes the repository, builds the fleet link, the ingest path, the director, the
rollout engine, remote jobs and the HTTP application, and runs the long-running parts under
one supervisor. Nothing else reads configuration, and there are no module-level singletons.

Stopping (SIGTERM, SIGINT, or ``stop``) runs in this order, so nothing is lost: the HTTP
server stops taking requests; the services are cancelled; what the ingest path holds is
stored and acknowledged (within ``shutdown_grace_s``); the broker link closes cleanly (the
session stays on the broker, holding what arrives meanwhile); the store closes.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import structlog
from aiohttp import web

from edgelm_control.api.app import create_app
from edgelm_control.api.auth import TokenChecker, read_tokens_file
from edgelm_control.api.context import ApiContext
from edgelm_control.clock import Clock, SystemClock
from edgelm_control.config import ControlConfig
from edgelm_control.director import Director
from edgelm_control.errors import ConfigError
from edgelm_control.fleet.decoder import TelemetryDecoder
from edgelm_control.fleet.ingest import Ingestor
from edgelm_control.fleet.link import FleetLink, mqtt_settings
from edgelm_control.hub import FleetHub
from edgelm_control.jobs.service import RemoteJobs
from edgelm_control.metrics import ControlMetrics
from edgelm_control.repository.director_keys import DirectorKeyring
from edgelm_control.repository.service import RepositoryService
from edgelm_control.rollouts.actions import RolloutActions
from edgelm_control.rollouts.driver import RolloutDriver
from edgelm_control.rollouts.engine import RolloutEngine
from edgelm_control.store import Store, redacted
from edgelm_control.store.events import prune_events
from edgelm_control.store.telemetry import prune_telemetry
from edgelm_control.store.tokens import replace_file_tokens
from edgelm_control.supervisor import Service, Supervisor
from edgelm_protocol import CONTROL_SENDER, Announce, Topic, encode, new_envelope
from edgelm_protocol.mqtt import MqttError

log = structlog.get_logger(__name__)

LINGERING_S = 2.0


@dataclass(frozen=True)
class ReadyInfo:
    http_host: str
    http_port: int
    fleet: str
    db: str
    broker: str
    scheme: str = "http"  # "https" with http_tls_cert


class ControlService:
    def __init__(self, config: ControlConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.ready = asyncio.Event()
        self.info: ReadyInfo | None = None
        self._stop = asyncio.Event()
        # Built by run(); kept for tests that look inside a running control plane.
        self.store: Store | None = None
        self.driver: RolloutDriver | None = None
        self.engine: RolloutEngine | None = None
        self.link: FleetLink | None = None
        self.ingestor: Ingestor | None = None
        self.director: Director | None = None
        self.app: web.Application | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Build everything, serve until :meth:`stop`, then shut down in order."""
        config = self.config
        clock = self.clock
        metrics = ControlMetrics()
        hub = FleetHub(config.sse_queue_max)
        keyring = DirectorKeyring(config.keys_dir, config.repository_dir / "metadata")
        tokens = read_tokens_file(config.tokens_file)
        store = self.store = await Store.open(config.db)
        try:
            async with store.write() as conn:
                await replace_file_tokens(conn, tokens)
            link = self.link = FleetLink(
                mqtt_settings(
                    config.broker,
                    client_id=config.client_id,
                    receive_maximum=config.mqtt_receive_maximum,
                    session_expiry_s=config.mqtt_session_expiry_s,
                    ca_file=config.broker_ca,
                    cert_file=config.broker_cert,
                    key_file=config.broker_key,
                ),
                fleet=config.fleet,
                share_group=config.shared_group,
                metrics=metrics,
            )

            async def announce(version: int) -> None:
                envelope = new_envelope(
                    Announce(timestamp_version=version), sender=CONTROL_SENDER, ts_ms=clock.now_ms()
                )
                try:
                    await link.publish(Topic.announce(config.fleet), encode(envelope), retain=True)
                except MqttError as exc:  # announced again on the next connection
                    log.warning("announce_failed", version=version, error=type(exc).__name__)

            repository = RepositoryService(
                config.repository_dir, config.keys_dir, store, clock, announce,
                director_keys=keyring,
            )  # fmt: skip
            await repository.sync_index()
            keyring.signing_key()  # a root naming a key this server lacks stops it here
            director = self.director = Director(
                fleet=config.fleet,
                key=keyring.signing_key,
                store=store,
                publisher=link,
                clock=clock,
                metrics=metrics,
                expiry_s=config.desired_expiry_s,
            )
            actions = RolloutActions(director=director, clock=clock, metrics=metrics)
            engine = self.engine = RolloutEngine(store=store, actions=actions, clock=clock, hub=hub)
            driver = self.driver = RolloutDriver(
                store=store,
                actions=actions,
                engine=engine,
                clock=clock,
                hub=hub,
                tick_s=config.engine_tick_s,
                sees_fleet=lambda: link.connected,
            )
            jobs = RemoteJobs(
                fleet=config.fleet,
                store=store,
                publisher=link,
                clock=clock,
                metrics=metrics,
                hub=hub,
            )
            decoder = TelemetryDecoder(config.ingest_decode_workers)
            ingestor = self.ingestor = Ingestor(
                store=store,
                link=link,
                clock=clock,
                metrics=metrics,
                batch_max=config.ingest_batch_max,
                flush_interval_s=config.ingest_flush_interval_s,
                decoder=decoder,
                crash_point=config.crash_point,
            )
            ingestor.add_listener(driver)
            ingestor.add_listener(jobs)

            async def announce_current() -> None:
                await announce(await repository.timestamp_version())

            # A broker that held no session for us may hold no retained desired states either.
            link.when_session_lost("desired_republish", director.republish_current)
            link.when_connected("desired", director.publish_pending)
            link.when_connected("jobs", jobs.dispatch)
            link.when_connected("announce", announce_current)
            repository.when_root_published("director", director.resign_other_keys)

            ctx = ApiContext(
                fleet=config.fleet,
                store=store,
                engine=engine,
                jobs=jobs,
                repository=repository,
                link=link,
                hub=hub,
                metrics=metrics,
                tokens=TokenChecker(store),
                clock=clock,
                max_body_bytes=config.max_body_bytes,
                max_upload_bytes=config.max_upload_bytes,
                sse_heartbeat_s=config.sse_heartbeat_s,
                device_timeout_s=config.device_timeout_s,
                pending_expiry_s=config.pending_expiry_s,
            )

            async def maintain() -> None:
                while True:
                    await asyncio.sleep(config.maintenance_interval_s)
                    await self._maintain(director, repository, store)

            supervisor = Supervisor(
                [
                    Service("ingest_receive", ingestor.receive),
                    Service("ingest_decode", ingestor.decode_telemetry),
                    Service("ingest_store", ingestor.run),
                    Service("rollouts", driver.run),
                    Service("maintenance", maintain),
                ],
                metrics,
            )
            app = self.app = create_app(ctx)
            runner = web.AppRunner(
                app,
                handle_signals=False,
                access_log=None,
                shutdown_timeout=max(config.shutdown_grace_s, 0.1),
                # After an early answer (a push refused before its blobs), read and drop the
                # rest of the body for at most this long; aiohttp's 10 s held shutdowns.
                lingering_time=LINGERING_S,
            )
            await runner.setup()
            site = web.TCPSite(
                runner, config.http.host, config.http.port, ssl_context=https_context(config)
            )
            await site.start()
            host, port = _bound(runner, config)
            await link.start()
            services = asyncio.get_running_loop().create_task(supervisor.run())
            try:  # re-sign what expired while the control plane was down, at once
                await self._maintain(director, repository, store)
            except Exception:  # the maintenance service tries again on its schedule
                log.exception("maintenance_failed_at_start")
            try:  # apart: a maintenance failure must not skip it (nothing else retries it)
                await director.resign_other_keys()  # a rotation cut short by a crash
            except Exception:
                log.exception("root_hook_failed", hook="director", at_start=True)
            self.info = ReadyInfo(
                host, port, config.fleet, redacted(config.db), str(config.broker), config.scheme
            )
            log.info(
                "control_ready",
                http=f"{host}:{port}",
                fleet=config.fleet,
                db=redacted(config.db),
                broker=str(config.broker),
                client_id=config.client_id,
            )
            self.ready.set()
            await self._stop.wait()
            log.info("control_stopping")
            ctx.draining = True
            hub.close()  # open event streams end now, not at their next heartbeat
            await runner.shutdown()
            services.cancel()
            await asyncio.gather(services, return_exceptions=True)
            try:
                async with asyncio.timeout(config.shutdown_grace_s or None):
                    await ingestor.drain()
            except Exception as exc:  # what was not stored is not acked: it comes again
                log.warning("ingest_drain_incomplete", error=f"{type(exc).__name__}: {exc}")
            await runner.cleanup()
            await link.stop()
            decoder.close()
        finally:
            await store.close()
        log.info("control_stopped")

    async def _maintain(
        self, director: Director, repository: RepositoryService, store: Store
    ) -> None:
        config = self.config
        await director.resign_expiring(before_s=config.desired_resign_before_s)
        await repository.refresh(before_s=config.timestamp_refresh_before_s)
        now_ms = self.clock.now_ms()
        async with store.write() as conn:
            telemetry = await prune_telemetry(
                conn, before_ms=now_ms - config.telemetry_retention_s * 1000
            )
            events = await prune_events(conn, before_ms=now_ms - config.event_retention_s * 1000)
        if telemetry or events:
            log.info("store_pruned", telemetry=telemetry, events=events)


def https_context(config: ControlConfig) -> ssl.SSLContext | None:
    """The HTTPS server context from ``http_tls_cert`` and ``http_tls_key``, or ``None`` for
    plain HTTP. A certificate that cannot be loaded stops the start with a ConfigError."""
    if config.http_tls_cert is None or config.http_tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.http_tls_cert, config.http_tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the HTTPS certificate {config.http_tls_cert} and key "
            f"{config.http_tls_key}: {exc}"
        ) from exc
    return context


def _bound(runner: web.AppRunner, config: ControlConfig) -> tuple[str, int]:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return str(address[0]), int(address[1])
    return config.http.host, config.http.port
