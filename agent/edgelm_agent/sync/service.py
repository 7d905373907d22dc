"""Fleet sync, the I/O shell around :class:`~edgelm_agent.sync.session.SyncSession`.

A supervised service (``name = "sync"``) of an enrolled agent. It owns the MQTT client and
runs five loops under one task group:

* **inbound**: every message the broker delivers goes through the session; its actions are
  carried out here (acknowledgements, outbox deletions, desired states, remote jobs);
* **drain**: the outbox, in priority order, published while connected; a durable message is
  deleted when the control plane acknowledges it, telemetry on PUBACK;
* **registry events**: the registry's numbered history moved into the outbox after a cursor;
* **telemetry**: a batch every ``telemetry_interval_s``;
* **desired**: the newest verified desired state applied (install, then activate with the
  health check), a newer one cancelling the one in progress.

The director keys it verifies with come from :mod:`edgelm_agent.sync.director_trust`: the
bundle's, replaced by those of a newer verified TUF root after each refresh (a failed one too:
python-tuf keeps every root it verified before it fetches the rest). A desired state signed
by an unknown key waits for a refresh through that module's :class:`KeyRefreshGate`: one
state, one refresh at a time, ``sync_key_refresh_interval_s`` apart.

Offline is the normal case: nothing in serving, jobs or the registry waits for this service,
and while the broker is unreachable the outbox simply fills (within its caps).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from edgelm_agent import __version__
from edgelm_agent.config import AgentConfig
from edgelm_agent.enrollment import Enrollment, tls_files
from edgelm_agent.errors import ConfigError, EdgelmError, ModelNotFound
from edgelm_agent.jobs import store
from edgelm_agent.jobs.database import Database
from edgelm_agent.jobs.outbox import MessageKind, Outbox
from edgelm_agent.jobs.submission import parse_job
from edgelm_agent.jobs.worker import JobWorker
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.model_manager import ModelManager
from edgelm_agent.registry.errors import InstallCancelled, RegistryError
from edgelm_agent.registry.model_target import ModelTarget
from edgelm_agent.registry.registry import Registry
from edgelm_agent.registry.state import RegistryState
from edgelm_agent.serving import ModelHost
from edgelm_agent.sync import registry_events
from edgelm_agent.sync.director_trust import DirectorTrust, KeyRefreshGate
from edgelm_agent.sync.session import (
    AckInbound,
    Action,
    ApplyDesired,
    DeleteOutbox,
    Dropped,
    EnqueueJob,
    Publish,
    PublishState,
    Refresh,
    RefreshForKey,
    ReportEvent,
    Subscribe,
    SyncSession,
)
from edgelm_agent.sync.telemetry import SystemStats, telemetry_body
from edgelm_protocol import EventKind, PresenceStatus, ReportedState, new_envelope
from edgelm_protocol import encode as encode_envelope
from edgelm_protocol.bodies import ModelRef
from edgelm_protocol.desired import DesiredState
from edgelm_protocol.mqtt import (
    ConnectionInfo,
    MqttClient,
    MqttRefused,
    MqttSettings,
    MqttTransportError,
    MqttWill,
    ReconnectBackoff,
    parse_broker_url,
)
from edgelm_protocol.mqtt.settings import client_tls_context, require_tls_unless_loopback
from edgelm_protocol.topics import Channel

log = structlog.get_logger(__name__)

DRAIN_BATCH = 100
POLL_S = 1.0  # how often the drain and event loops look when nothing woke them
PROGRESS_EVERY_S = 5.0  # download progress events, at most this often
MAX_INSTALLED_REPORTED = 64


def mqtt_settings(config: AgentConfig, enrollment: Enrollment) -> MqttSettings:
    """The device's MQTT session: its own client id, persistent for days, a will.

    The broker URL is parsed by the protocol package, as the control plane parses its own
    (``?protocol=3.1.1`` selects MQTT 3.1.1); a bad one raises ``InvalidBrokerUrl`` (a
    ValueError) naming the problem. The bundle's per-device credentials win over any in the
    URL. With the bundle's ``tls`` (a fleet CA), ``mqtts://`` is mutual TLS against that CA
    alone, and plain ``mqtt://`` is refused (``ValueError``) unless the broker is loopback.
    """
    broker = parse_broker_url(enrollment.broker_url)
    from_bundle = enrollment.broker_username is not None
    tls = None
    if enrollment.tls_ca is not None:
        # The fleet's CA is the only trust anchor and the bundle's certificate the identity
        # (mutual TLS); without TLS, the broker must be on this machine.
        if broker.tls:
            ca, cert, key = tls_files(config.state_dir)
            try:
                tls = client_tls_context(str(ca), str(cert), str(key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load the fleet TLS identity from {ca.parent}: {exc}; "
                    "enroll the device again (edgelm agent enroll BUNDLE)"
                ) from exc
        else:
            require_tls_unless_loopback(broker.host, what="the enrollment's broker URL")
    elif broker.tls:  # a bundle without a CA: the system's trust store
        tls = client_tls_context(None)
    return MqttSettings(
        host=broker.host,
        port=broker.port,
        tls=tls,
        client_id=enrollment.device_id,
        username=enrollment.broker_username if from_bundle else broker.username,
        password=enrollment.broker_password if from_bundle else broker.password,
        protocol_version=broker.protocol_version,
        session_expiry_s=config.mqtt_session_expiry_s,
        will=None,  # set by the service: its payload is an envelope
    )


@dataclass
class DesiredRun:
    state: DesiredState  # replaced when the director renews it (same target, newer sequence)
    cancel: threading.Event = field(default_factory=threading.Event)
    task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done() and not self.cancel.is_set()


class SyncService:
    name = "sync"

    def __init__(
        self,
        config: AgentConfig,
        enrollment: Enrollment,
        *,
        db: Database,
        outbox: Outbox,
        registry: Registry,
        models: ModelManager,
        host: ModelHost,
        worker: JobWorker,
        metrics: AgentMetrics,
    ) -> None:
        self.config = config
        self.enrollment = enrollment
        self.db = db
        self.outbox = outbox
        self.registry = registry
        self.models = models
        self.host = host
        self.worker = worker
        self.metrics = metrics
        self.stats = SystemStats(config.state_dir)
        self.director_trust = DirectorTrust(
            config.state_dir, enrollment, registry.config.root / "metadata"
        )
        self.director_trust.learn()  # the root verified at enrollment may name the keys
        self.session = SyncSession(
            fleet=enrollment.fleet,
            device=enrollment.device_id,
            keys=self.director_trust.keys,
            agent_version=__version__,
            ack_timeout_s=config.sync_ack_timeout_s,
        )
        self._client: MqttClient | None = None
        self._desired: DesiredRun | None = None
        self._registry_changed = asyncio.Event()
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshes_begun = 0  # metadata refreshes started, and the newest one finished
        self._refresh_done = 0
        self._key_gate: KeyRefreshGate[RefreshForKey] = KeyRefreshGate(
            config.sync_key_refresh_interval_s
        )
        self._key_task: asyncio.Task[None] | None = None

    # --- what the local API shows ---

    def status(self) -> dict[str, Any]:
        running = self._desired
        return {
            "fleet": self.enrollment.fleet,
            "device": self.enrollment.device_id,
            "broker": {"url": self.enrollment.broker_url, "connected": self.session.connected},
            "desired": {
                "applied_sequence": self.session.applied_sequence,
                "in_progress": None
                if running is None or running.task is None or running.task.done()
                else {
                    "sequence": running.state.sequence,
                    "target": None if running.state.target is None else running.state.target.path,
                },
            },
        }

    # --- the service ---

    async def run(self) -> None:
        applied, known_good = await self.db.read(
            lambda c: (
                registry_events.get_value(c, registry_events.APPLIED),
                registry_events.get_value(c, registry_events.KNOWN_GOOD),
            )
        )
        self.session.applied_sequence = int(applied or 0)
        self.session.known_good_s = int(known_good or 0)
        self.metrics.desired_sequence.set(self.session.applied_sequence)
        await self.db.run(registry_events.start_cursor(self.registry.state().next_seq))
        settings = mqtt_settings(self.config, self.enrollment)
        will = MqttWill(
            topic=self.session.topic(Channel.PRESENCE),
            payload=self.session.presence(PresenceStatus.OFFLINE, _now_ms()),
            qos=1,
            retain=True,
        )
        client = MqttClient(
            _with_will(settings, will),
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        self._client = client
        await client.start()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._inbound(client))
                group.create_task(self._drain(client))
                group.create_task(self._registry_events())
                group.create_task(self._telemetry())
        finally:
            if self._refresh_task is not None:
                self._refresh_task.cancel()  # its thread finishes on its own; nothing waits
            if self._key_task is not None:
                self._key_task.cancel()
            await self._stop_desired()
            await self._goodbye(client)

    async def _goodbye(self, client: MqttClient) -> None:
        """A clean stop says ``offline`` itself (the will fires only on a lost connection)."""
        with contextlib.suppress(Exception):
            if client.connected:
                await client.publish(
                    self.session.topic(Channel.PRESENCE),
                    self.session.presence(PresenceStatus.OFFLINE, _now_ms()),
                    qos=1,
                    retain=True,
                    timeout_s=5,
                )
        with contextlib.suppress(Exception):
            await client.stop()
        self.session.on_disconnected()
        self.metrics.sync_connected.set(0)

    async def _on_connect(self, info: ConnectionInfo) -> None:
        log.info("sync_connected", broker=self.enrollment.broker_url, session=info.session_present)
        await self._do(self.session.on_connected(_now_ms()))
        self.metrics.sync_connected.set(1)
        self.outbox.wake()

    def _on_disconnect(self) -> None:
        # From the client's own end of the connection: a poll of `client.connected` could
        # land inside the on-connect hook, before the client counts as connected, and take
        # the session down for good (seen with 500 devices on one machine).
        if self.session.connected:
            self.session.on_disconnected()
            self.metrics.sync_connected.set(0)
            log.info("sync_disconnected", broker=self.enrollment.broker_url)

    # --- the loops ---

    async def _inbound(self, client: MqttClient) -> None:
        async for message in client.messages():
            actions = self.session.on_message(
                message.topic, message.payload, message, int(time.time())
            )
            await self._do(actions)

    async def _drain(self, client: MqttClient) -> None:
        while True:
            if client.connected and self.session.connected:
                messages = await self.outbox.peek(DRAIN_BATCH)
                await self._do(self.session.on_outbox(messages, time.time()))
            counts = await self.outbox.counts()
            for kind, count in counts.items():
                self.metrics.outbox_messages.labels(str(kind)).set(count)
            await self.outbox.wait_for_change(POLL_S)

    async def _registry_events(self) -> None:
        while True:
            state = await asyncio.to_thread(self.registry.state)
            moved = await self.db.run(
                registry_events.transfer(state.events_after(0), self.outbox.limits)
            )
            if moved:
                self.outbox.wake()
                await self._publish_state()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S * 2):  # not wait_for: it can swallow a cancel
                    await self._registry_changed.wait()
            self._registry_changed.clear()

    async def _telemetry(self) -> None:
        window_source = self.metrics.window
        while True:
            await asyncio.sleep(self.config.telemetry_interval_s)
            now = time.monotonic()
            window = window_source.take(now)
            active = self.registry.state().active
            body = telemetry_body(
                window,
                now=now,
                model=active,
                queue_depth=self.host.active.scheduler.queue_depth if self.host.active else 0,
                stats=self.stats,
            )
            await self.outbox.put(MessageKind.TELEMETRY, body)

    # --- actions ---

    async def _do(self, actions: list[Action]) -> None:
        for action in actions:
            await self._one(action)

    async def _one(self, action: Action) -> None:
        client = self._client
        assert client is not None
        if isinstance(action, Publish):
            await self._publish(client, action)
        elif isinstance(action, AckInbound):
            client.ack(action.token)
        elif isinstance(action, DeleteOutbox):
            await self.outbox.ack(action.ids)
        elif isinstance(action, Subscribe):
            await client.subscribe(list(action.filters))
        elif isinstance(action, PublishState):
            await self._publish_state()
        elif isinstance(action, ApplyDesired):
            await self._start_desired(action.state)
        elif isinstance(action, EnqueueJob):
            await self._enqueue(client, action)
        elif isinstance(action, ReportEvent):
            await self._report(action)
        elif isinstance(action, Refresh):
            log.info("repository_announced", timestamp_version=action.timestamp_version)
            self._schedule_refresh()
        elif isinstance(action, RefreshForKey):
            log.info("desired_key_unknown", keyids=[k[:16] for k in action.keyids])
            replaced = self._key_gate.offer(action, asked=self._refreshes_begun)
            if replaced is not None:
                log.warning("desired_key_refresh_dropped",
                            keyids=[k[:16] for k in replaced.keyids])  # fmt: skip
            if self._key_task is None or self._key_task.done():
                self._key_task = asyncio.get_running_loop().create_task(self._unknown_keys())
        elif isinstance(action, Dropped):
            log.warning("sync_message_dropped", topic=action.topic, code=action.code,
                        reason=action.reason[:500])  # fmt: skip

    def _schedule_refresh(self) -> None:
        """Refresh the repository's metadata soon after an announcement: the device learns of
        new models (remote jobs may name them) and of a repository frozen or expired, before
        a desired state needs it. One at a time; announcements meanwhile are folded in."""
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        # Every device hears the announcement at once: spread the repository's load.
        await asyncio.sleep(random.uniform(0, self.config.sync_refresh_jitter_s))
        await self._refresh_now()

    async def _refresh_now(self) -> None:
        """Fetch and verify the repository's metadata, in the registry thread as the local
        API does (never beside an activation); a failure is only logged."""
        self._refreshes_begun += 1
        number = self._refreshes_begun
        try:
            try:
                offered = await self.models.exclusive_work(
                    lambda cancel: self.registry.available(), what="metadata refresh"
                )
                log.info("repository_refreshed", offered=len(offered))
            except EdgelmError as exc:
                log.warning("repository_refresh_failed", error=f"{exc.code}: {exc}"[:500])
            except Exception:  # a bug here must not kill the sync service
                log.exception("repository_refresh_failed")
            # Whether or not the refresh succeeded: python-tuf persists each root it verified
            # before it fetches the timestamp, and a network that lets the roots through but
            # blocks the rest must not keep this device on a retired director key.
            await self._learn_director_keys()
        finally:  # after the keys: a state waiting on this refresh is verified with them
            self._refresh_done = max(self._refresh_done, number)

    async def _learn_director_keys(self) -> None:
        try:
            keys = await asyncio.to_thread(self.director_trust.learn)  # from the verified root
        except Exception:  # the file could not be written, say: the next refresh tries again
            log.exception("repository_refresh_failed")
            return
        if keys is not None:
            self.session.keys = keys

    async def _unknown_keys(self) -> None:
        """Desired states signed by unknown keys, one at a time: the newest waiting one gets
        a refresh (unless one begun since it came has finished), no sooner than
        ``sync_key_refresh_interval_s`` after the last such refresh began, and is then
        verified once more, under the keys the refreshed root names."""
        gate = self._key_gate
        while (waiting := gate.peek()) is not None:
            if self._refresh_done <= waiting.asked:  # none begun since it came has finished
                pause = gate.wait_s(time.monotonic())
                if pause > 0:
                    log.info("desired_key_refresh_deferred", retry_in_s=round(pause, 1))
                    await asyncio.sleep(pause)
                    continue  # a newer state may have taken its place meanwhile
                gate.take()
                gate.started(time.monotonic())
                await self._refresh_now()
            else:
                gate.take()
            action = waiting.item
            await self._do(
                self.session.retry_desired(action.topic, action.document, int(time.time()))
            )

    async def _publish(self, client: MqttClient, action: Publish) -> None:
        try:
            await client.publish(action.topic, action.payload, qos=1, retain=action.retain)
        except MqttTransportError:
            if action.message is not None:
                self.session.on_publish_failed(action.message)
            return
        except MqttRefused as exc:
            log.error("sync_publish_refused", topic=action.topic, error=str(exc))
            if action.message is not None:
                self.session.on_publish_failed(action.message)
            return
        if action.message is not None:
            await self._do(self.session.on_published(action.message))

    async def _publish_state(self) -> None:
        # No `client.connected` check: the first publish happens inside the on-connect hook,
        # before the client counts as connected. The state is retained and sent again on
        # every connection, so a publish lost to a dropped link is only logged.
        client = self._client
        if client is None:
            return
        state = await asyncio.to_thread(self.registry.state)
        body = self._reported_state(state)
        payload = encode_envelope(
            new_envelope(body, sender=self.enrollment.device_id, ts_ms=_now_ms())
        )
        try:
            await client.publish(self.session.topic(Channel.STATE), payload, qos=1, retain=True)
        except (MqttTransportError, MqttRefused) as exc:
            log.info("sync_state_not_published", error=str(exc)[:300])

    def _reported_state(self, state: RegistryState) -> ReportedState:
        def ref(key: str | None) -> ModelRef | None:
            target = state.models.get(key) if key else None
            return None if target is None else _model_ref(target)

        active_model = self.host.active
        accelerator = "none"
        if active_model is not None and active_model.info.accelerator.gpu_offload:
            accelerator = active_model.info.accelerator.execution_provider or "gpu"
        installed = [_model_ref(t) for _, t in sorted(state.models.items())]
        return ReportedState(
            active=ref(state.active),
            previous=ref(state.previous),
            installed=tuple(installed[:MAX_INSTALLED_REPORTED]),
            hardware_class=self.enrollment.hardware_class,
            labels=dict(self.enrollment.labels),
            ram_bytes=self.stats.memory_total_bytes() or 0,
            accelerator=accelerator,
            disk_free_bytes=self.stats.disk_free_bytes() or 0,
            desired_sequence=self.session.applied_sequence,
        )

    async def _report(self, event: ReportEvent, **extra: Any) -> None:
        body = {
            "kind": event.kind.value,
            "model": event.model,
            "desired_sequence": event.desired_sequence,
            "rollout": event.rollout,
            "reason": None if event.reason is None else event.reason[:2000],
            "health": None,
            "progress": None,
            **extra,
        }
        try:
            await self.outbox.put(MessageKind.EVENT, body)
        except EdgelmError as exc:  # the outbox is full: the event waits in the log only
            log.error("sync_event_not_queued", kind=event.kind.value, error=str(exc))

    async def _enqueue(self, client: MqttClient, action: EnqueueJob) -> None:
        """A remote job enters the durable queue; the broker hears of it only once it is
        committed, so a crash before that makes the broker deliver it again."""
        job = action.job
        submission = {
            "request": job.request,
            "priority": job.priority,
            "metadata": job.metadata,
            "max_attempts": job.max_attempts,
            "idempotency_key": store.FLEET_KEY_PREFIX + action.message_id,
            "report": "upstream",
            "wait_for_model": job.wait_for_model,
        }
        if job.ttl_s is not None:
            submission["ttl_s"] = job.ttl_s
        try:
            spec = parse_job(submission, time.time())
            if not spec.wait_for_model:  # as the local API: no job waits for a model in vain
                known = await self.models.known_models()
                if spec.model not in known:
                    # Pushed a moment ago, maybe: look at the repository once before refusing.
                    await self._refresh_now()
                    known = await self.models.known_models()
                if spec.model not in known:
                    raise ModelNotFound(spec.model, sorted(known), what="installed or offered")
        except EdgelmError as exc:  # the request itself is wrong: it ends now, reported
            await self._refuse(client, action, exc)
            return
        queue = store.QueueLimits(self.config.max_queued_jobs, self.config.max_queued_job_bytes)
        try:
            view, created = await self.db.run(store.submit(spec, self.outbox.limits, queue))
        except (store.OutboxFullForJobs, store.JobQueueFull) as exc:
            # Full now means full for a while: refuse and report it (the operator sees why
            # in the job's per-device result) rather than leave it to come back unacked.
            await self._refuse(client, action, exc)
            return
        except EdgelmError as exc:  # the disk: leave it unacknowledged, it comes again
            log.error("remote_job_not_stored", job=action.message_id, error=str(exc))
            return
        client.ack(action.token)
        if created:
            self.worker.wake()
            log.info("remote_job_queued", job=action.message_id, local_id=view["id"])

    async def _refuse(self, client: MqttClient, action: EnqueueJob, exc: EdgelmError) -> None:
        """The job ends before it is queued: its failed result goes to the outbox, and only
        then is the message acknowledged."""
        await self.db.run(store.refused_remote_job(action.message_id, action.job.metadata, exc))
        client.ack(action.token)
        self.outbox.wake()
        log.info("remote_job_refused", job=action.message_id, error=exc.code)

    # --- desired states ---

    async def _start_desired(self, state: DesiredState) -> None:
        current = self._desired
        if current is not None and current.running and current.state == state:
            # The state being acted on, delivered again (the retained copy after a reconnect
            # under load): the run goes on; restarting it would download again.
            log.info("desired_state_already_running", sequence=state.sequence)
            return
        if current is not None and current.running and _renews(current.state, state):
            # The director renewed the state before it expired: same target, same rollout,
            # a new sequence. The run goes on (a download is not started again) and counts
            # for the new sequence when it ends.
            log.info("desired_state_renewed", sequence=state.sequence,
                     replaces=current.state.sequence)  # fmt: skip
            current.state = state
            return
        if current is not None:
            current.cancel.set()  # latest wins: a download in progress stops
        run = DesiredRun(state)
        run.task = asyncio.get_running_loop().create_task(self._apply_after(current, run))
        self._desired = run

    async def _apply_after(self, before: DesiredRun | None, run: DesiredRun) -> None:
        """Apply ``run`` once the run it supersedes has ended. A download stops at once; an
        activation under way cannot be cut short, so it finishes first, and a release that
        follows sees what it did."""
        if before is not None and before.task is not None:
            await asyncio.wait({before.task})  # neither raises what it raised nor hides ours
        if not run.cancel.is_set():  # superseded in turn while it waited: the newer one acts
            await self._apply(run)

    async def _stop_desired(self) -> None:
        run = self._desired
        if run is None or run.task is None or run.task.done():
            return
        run.cancel.set()
        # asyncio.wait neither raises what the run raised nor swallows our own cancellation.
        _, still = await asyncio.wait({run.task}, timeout=60)
        if still:
            log.error("desired_state_run_stuck", sequence=run.state.sequence)

    async def _apply(self, run: DesiredRun) -> None:
        state = run.state
        target = state.target
        cause = {"desired_sequence": state.sequence, "rollout": state.rollout}
        if target is None:
            try:
                await self._release(state, cause)
            finally:
                await self._done(run.state)
            return
        log.info("desired_state_applying", sequence=state.sequence, target=target.path)
        await self._report(_event(EventKind.DESIRED_ACCEPTED, state))
        try:
            registry_state = await asyncio.to_thread(self.registry.state)
            installed = _installed(registry_state, target.path, target.sha256)
            if installed is not None and registry_state.active == installed.ref:
                if registry_state.active_rollout != state.rollout:
                    await self.models.claim(state.rollout)  # a release of another leaves it
                await self._already_active(installed, registry_state, state)
                return
            if installed is None:
                installed = await self._install(run)
                if installed is None:
                    return
            try:
                await self.models.activate(installed.ref, details=cause)
            except EdgelmError as exc:  # recorded in the history: reported from there
                log.warning("desired_state_not_activated", model=installed.ref, error=str(exc))
        finally:
            await self._done(run.state)  # the newest sequence, if the state was renewed

    async def _release(self, state: DesiredState, cause: dict[str, Any]) -> None:
        """A desired state with no target: the fleet assigns this device no model.

        The download it superseded has stopped already (latest wins). What remains is to undo
        the switch the named rollout made, if it made one and nothing changed since: back to
        the previous model, or to serving none when there is no previous one. A model that
        someone else activated (a local operator, another rollout) is left alone.
        """
        reason = f"released by the fleet (rollout {state.rollout})"
        try:
            outcome = await self.models.release(state.rollout, details=cause, reason=reason)
        except EdgelmError as exc:  # a failed activation is in the history: reported there
            log.warning("desired_state_release_failed", error=str(exc))
            return
        log.info("desired_state_release", sequence=state.sequence, rollout=state.rollout,
                 outcome=outcome or "nothing of this rollout's runs")  # fmt: skip

    async def _install(self, run: DesiredRun) -> ModelTarget | None:
        """Download and verify the target. A transient failure (the network, a repository
        being re-signed) is tried again with backoff for as long as this desired state
        stands and has not expired; anything else is final and reported as
        ``install_failed``. The partial file is kept between tries, so each resumes."""
        state, target = run.state, run.state.target
        assert target is not None
        await self._report(_event(EventKind.DOWNLOAD_STARTED, state))
        progress = _Progress()
        reporter = asyncio.get_running_loop().create_task(self._progress(progress, state))
        longest = self.config.sync_retry_max_s
        backoff = ReconnectBackoff(min(self.config.sync_retry_min_s, longest), longest)
        attempt = 0
        try:
            while True:
                try:
                    return await asyncio.to_thread(
                        self.registry.install_target,
                        target.path,
                        length=target.length,
                        sha256=target.sha256,
                        progress=progress.update,
                        cancel=run.cancel,
                        details={"desired_sequence": state.sequence, "rollout": state.rollout},
                    )
                except InstallCancelled as exc:
                    await self._report(_event(EventKind.INSTALL_CANCELLED, state, reason=str(exc)))
                    return None
                except RegistryError as exc:
                    reason = f"{exc.code}: {exc}"
                    pause = backoff.delay_s(attempt)
                    now = max(time.time(), self.session.known_good_s)  # as verification does
                    if not exc.transient or now + pause >= run.state.expires:
                        await self._report(_event(EventKind.INSTALL_FAILED, state, reason=reason))
                        log.warning("desired_state_install_failed", target=target.path,
                                    error=str(exc), attempts=attempt + 1)  # fmt: skip
                        return None
                attempt += 1
                log.info("desired_state_install_retry", target=target.path, attempt=attempt,
                         retry_in_s=round(pause, 1), error=reason[:300])  # fmt: skip
                # The event log shows the retries; they are not progress, so the rollout's
                # device timeout still runs (the row turns timed_out, and succeeded later).
                retry = f"retry {attempt} in {pause:.0f} s after {reason}"
                await self._report(_event(EventKind.DOWNLOAD_RETRYING, state, reason=retry))
                if await _cancelled_within(run.cancel, pause):
                    await self._report(
                        _event(EventKind.INSTALL_CANCELLED, state, reason="superseded")
                    )
                    return None
        finally:
            reporter.cancel()

    async def _progress(self, progress: _Progress, state: DesiredState) -> None:
        sent = (-1, -1)
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            now = (progress.done, progress.total)
            if now != sent and progress.total > 0:
                sent = now
                await self._report(
                    _event(EventKind.DOWNLOAD_PROGRESS, state),
                    progress={"done_bytes": progress.done, "total_bytes": progress.total},
                )

    async def _already_active(
        self, target: ModelTarget, registry_state: RegistryState, state: DesiredState
    ) -> None:
        """The target runs already: say so at once, with its last health-check figures."""
        health = None
        for entry in reversed(registry_state.history):
            if entry.event == "activated" and entry.model == target.ref and entry.details:
                health = entry.details.get("health")
                break
        await self._report(_event(EventKind.ACTIVATED, state, model=target.ref), health=health)

    async def _done(self, state: DesiredState) -> None:
        self.session.on_desired_done(state.sequence, state.issued_at, int(time.time()))
        applied, known_good = self.session.applied_sequence, self.session.known_good_s

        def persist(c: Any) -> None:
            registry_events.set_value(c, registry_events.APPLIED, str(applied))
            registry_events.set_value(c, registry_events.KNOWN_GOOD, str(known_good))

        await self.db.run(persist)
        self.metrics.desired_sequence.set(applied)
        self._registry_changed.set()
        await self._publish_state()


@dataclass
class _Progress:
    done: int = 0
    total: int = 0

    def update(self, phase: str, done: int, total: int) -> None:
        self.done, self.total = done, total


def _event(
    kind: EventKind, state: DesiredState, *, reason: str | None = None, model: str | None = None
) -> ReportEvent:
    return ReportEvent(
        kind,
        reason=reason,
        desired_sequence=state.sequence,
        rollout=state.rollout,
        model=model,
    )


async def _cancelled_within(cancel: threading.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True as soon as ``cancel`` is set (a thread-side event, as
    the registry's download checks it)."""
    deadline = time.monotonic() + seconds
    while not cancel.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, 0.25))
    return True


def _renews(current: DesiredState, new: DesiredState) -> bool:
    """``new`` only renews ``current``: the same target for the same rollout."""
    return (
        new.target is not None
        and new.target == current.target
        and new.rollout == current.rollout
        and new.sequence > current.sequence
    )


def _installed(state: RegistryState, path: str, sha256: str) -> ModelTarget | None:
    for target in state.models.values():
        if target.path == path and target.sha256 == sha256:
            return target
    return None


def _model_ref(target: ModelTarget) -> ModelRef:
    return ModelRef(name=target.name, version=target.version, sha256=target.sha256)


def _with_will(settings: MqttSettings, will: MqttWill) -> MqttSettings:
    return dataclasses.replace(settings, will=will)


def _now_ms() -> int:
    return int(time.time() * 1000)
