"""Activation: put a verified model in service, atomically, and fall back when it fails.

Steps, each a precondition of the next::

    verify (hash the blob against its signed target)
      → load (beside the old model, which keeps serving)
      → health check (a short generation within the target's time and speed budgets)
      → switch (one assignment: new requests go to the new model)
      → commit (state.json: active, previous, history)
      → retire the old model once the requests already on it have finished

A failure before the switch leaves the old model serving and records ``activation_failed``
with the reason: that is the automatic rollback. A ``kill -9`` anywhere before the commit
restarts on the old model; after it, on the new one. Never a half state.

Registry work (imports, installs, verification, gc) runs one call at a time in a thread of its
own (:class:`~edgelm_agent.worker_thread.WorkerThread`), under the same lock as activation. A
caller that goes away (a client hangs up, the agent stops) sets the work's cancel event, which
long work checks between chunks, and the lock is held until the thread has really finished:
the next registry change never runs beside a leftover of the last.

A model already loaded on demand (see :mod:`edgelm_agent.model_cache`) is not loaded a second
time to be activated: the activation re-verifies its blob, takes that copy over with the
figures of the health check it passed when it was loaded, and switches to it. A load cannot be
interrupted: an activation cancelled during one waits for it to end and closes what it loaded.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from edgelm_agent.config import AgentConfig
from edgelm_agent.crash_points import CrashPoint, crash_point_from, no_crash
from edgelm_agent.errors import EdgelmError, ModelError, RequestError
from edgelm_agent.inference.backend import Backend
from edgelm_agent.inference.loader import load_backend
from edgelm_agent.inference.scheduler import Scheduler, SchedulerHooks
from edgelm_agent.inference.types import (
    MIN_CONTEXT_LENGTH,
    Finished,
    GenerationRequest,
    SamplingDefaults,
    SamplingFields,
    TextDelta,
)
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.model_cache import CachedModel, Loaded, ModelCache, ref_of, run_to_end
from edgelm_agent.registry.errors import ActivationFailed, ModelNotInstalled
from edgelm_agent.registry.model_target import GENERATION, ModelTarget
from edgelm_agent.registry.registry import Registry
from edgelm_agent.registry.state import RegistryState
from edgelm_agent.serving import FailureStreak, ModelHost, ServingModel
from edgelm_agent.worker_thread import WorkerThread

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: At shutdown, how long registry work still running gets to notice its cancel and stop.
REGISTRY_STOP_WAIT_S = 10.0


class ModelManager:
    def __init__(
        self,
        registry: Registry,
        host: ModelHost,
        metrics: AgentMetrics,
        *,
        threads: int,
        context_length: int,
        max_queue: int,
        retry_after_s: int,
        background_every: int = 4,
        default_max_tokens: int = 512,
        gpu_layers: int | None = None,
        onnx_provider: str = "cpu",
        crash_point: CrashPoint = no_crash,
        ram_budget_bytes: int = 0,
        idle_unload_s: float | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.metrics = metrics
        self.threads = threads
        self.context_length = context_length
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.background_every = background_every
        self.default_max_tokens = default_max_tokens
        self.gpu_layers = gpu_layers
        self.onnx_provider = onnx_provider
        self._crash_point = crash_point  # fault injection for the kill -9 tests
        self._lock = asyncio.Lock()  # one activation or registry change at a time
        self._registry_thread = WorkerThread("edgelm-registry")
        #: The cancel event of the registry work running now, if any.
        self._running_cancel: threading.Event | None = None
        #: Other installed models, loaded on demand beside the active one.
        self.cache = ModelCache(
            host,
            registry,
            metrics,
            load=self.load_extra,
            budget_bytes=ram_budget_bytes,
            idle_unload_s=idle_unload_s,
            context_length=context_length,
            max_queue=max_queue,
            retry_after_s=retry_after_s,
            available_bytes=available_memory_bytes,
        )

    @classmethod
    def from_config(
        cls, config: AgentConfig, registry: Registry, host: ModelHost, metrics: AgentMetrics
    ) -> ModelManager:
        """The manager an agent runs with these settings (the daemon's, and the fleet
        benchmark's simulated devices')."""
        return cls(
            registry,
            host,
            metrics,
            threads=config.effective_threads(),
            context_length=config.context_length,
            max_queue=config.max_queue,
            retry_after_s=config.retry_after_s,
            background_every=config.jobs_background_every,
            default_max_tokens=config.default_max_tokens,
            gpu_layers=config.gpu_layers,
            onnx_provider=config.onnx_provider,
            crash_point=crash_point_from(config.crash_point),
            ram_budget_bytes=config.ram_budget_bytes,
            idle_unload_s=config.idle_unload_s,
        )

    async def start(self) -> None:
        """Serve the recorded active model, or the previous one if it no longer verifies."""
        state = self.registry.state()
        if state.active is None:
            return  # nothing is to be served (never was, or the fleet released the device)
        for ref in (state.active, state.previous):
            if ref is None or ref not in state.models:
                continue
            try:
                await self.activate(ref, event="started")
                return
            except EdgelmError as exc:
                log.error("model_start_failed", model=ref, error=str(exc))
        if state.active:
            log.error("no_verified_model", active=state.active, previous=state.previous)

    async def activate(
        self,
        ref: str,
        *,
        event: str = "activated",
        details: dict[str, Any] | None = None,
        reason: str = "requested",
    ) -> ModelTarget:
        """Verify, load, health-check and switch to ``ref``. ``details`` (the desired state
        and rollout that asked for it) go into the registry's history with the outcome, and
        with the health check's figures, which fleet rollouts compare across models."""
        async with self._lock:
            target, old, model = await self._activate_locked(ref, event, details, reason)
        if old is not None and old is not model:
            asyncio.get_running_loop().create_task(self._retire(old))
        self.metrics.models_loaded.set(len(self.host.models()))
        # Outside the lock: the cache takes its own lock first, then this one, to load.
        await self.cache.trim()
        return target

    async def load_extra(self, target: ModelTarget) -> Loaded | None:
        """Verify, load and health-check an installed model to serve beside the active one
        (for :class:`~edgelm_agent.model_cache.ModelCache`): the activation's steps, without
        the switch, under the same lock, so no registry change runs beside them. ``None``
        when an activation made it the active model while this waited for the lock."""
        async with self._lock:
            active = self.host.active
            if active is not None and ref_of(active) == target.ref:
                return None
            if target.ref not in (await asyncio.to_thread(self.registry.state)).models:
                raise ModelNotInstalled(f"model {target.ref} is no longer installed")
            model, health = await self._prepare(target)
            return Loaded(model, health)

    async def _activate_locked(
        self, ref: str, event: str, details: dict[str, Any] | None, reason: str
    ) -> tuple[ModelTarget, ServingModel | None, ServingModel]:
        """:meth:`activate`'s work, with the lock held: the target, what served before, and
        what serves now (the caller retires the old one once the lock is free)."""
        target = self.registry.find(ref)
        # A copy loaded on demand is taken over rather than loaded again beside itself; held
        # (leased) meanwhile, so that no unload closes it under the check.
        held = self.cache.hold(target.ref)
        try:
            model, health = await self._prepare(target, held)
        except BaseException as exc:
            if held is not None:
                self.cache.release(held)
            if not isinstance(exc, EdgelmError):
                raise
            reason = str(exc)
            await asyncio.to_thread(
                self.registry.update,
                lambda state: state.activation_failed(target.ref, reason, details),
            )
            log.error("activation_failed", model=target.ref, reason=reason)
            if isinstance(exc, ActivationFailed):
                raise
            raise ActivationFailed(
                f"{target.ref} was not activated: {reason}", reason=reason
            ) from exc
        old = self.host.active
        self._crash_point("activation.before_switch")
        if held is not None and held.model is model:
            self.cache.adopt(held)
        self.host.set_active(model)
        if held is not None and held.model is not model:
            self.cache.release(held)  # a copy that was failing: now unused, the cache drops it
        recorded = {**(details or {}), "health": health}

        def commit(state: RegistryState) -> RegistryState:
            if event == "rolled_back":
                return state.rolled_back(target.ref, reason, recorded)
            if state.active != target.ref or details is not None:
                return state.activated(target.ref, recorded)
            return state  # a restart on the recorded model: nothing new happened

        await asyncio.to_thread(self.registry.update, commit)
        self._crash_point("activation.after_commit")
        log.info("model_activated", model=target.ref, how=event)
        return target, old, model

    async def known_models(self) -> set[str]:
        """Models that are served, installed, or offered by the trusted repository, by name
        and by ``name@version``."""
        served = {name for m in self.host.models() for name in m.names}
        return served | await asyncio.to_thread(self.registry.known_names)

    async def exclusive(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking registry change in the registry thread, never beside an
        activation."""
        what = getattr(fn, "__name__", "registry work")
        return await self.exclusive_work(lambda cancel: fn(*args, **kwargs), what=what)

    async def exclusive_work(self, work: Callable[[threading.Event], T], *, what: str) -> T:
        """Like :meth:`exclusive`, for work that takes a cancel event and checks it between
        chunks (imports, installs, verification): if the caller goes away, it stops there."""
        async with self._lock:
            return await self._in_registry_thread(work, what)

    async def _in_registry_thread(self, work: Callable[[threading.Event], T], what: str) -> T:
        """Run ``work`` in the registry thread and wait for it. Cancelled, it sets the work's
        cancel event and still waits for the thread to finish (a second cancellation, the
        shutdown's, ends that wait), so the caller's lock covers the whole of the work."""
        cancel = threading.Event()
        self._running_cancel = cancel
        future = asyncio.wrap_future(self._registry_thread.submit(functools.partial(work, cancel)))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            log.info("registry_work_cancelled", work=what)
            await asyncio.wait({future})
            if not future.cancelled():
                future.exception()  # what it raised on the way out (Cancelled) goes unheard
            raise
        finally:
            if self._running_cancel is cancel:
                self._running_cancel = None

    async def rollback(
        self, *, details: dict[str, Any] | None = None, reason: str = "requested"
    ) -> ModelTarget:
        previous = self.registry.state().previous
        if previous is None:
            raise ModelNotInstalled("there is no previous model to roll back to")
        return await self.activate(previous, event="rolled_back", details=details, reason=reason)

    async def release(
        self, rollout: str | None, *, details: dict[str, Any] | None = None, reason: str
    ) -> str | None:
        """Undo what ``rollout`` switched, if the active model is still its doing: back to
        the previous model, or serve none when there is none. One step under the lock, so an
        activation cannot slip between the check and the undo. Returns ``"rolled_back"``,
        ``"deactivated"``, or None when there was nothing of ``rollout``'s to undo."""
        old: ServingModel | None = None
        model: ServingModel | None = None
        async with self._lock:
            state = await asyncio.to_thread(self.registry.state)
            if rollout is None or state.active is None or state.active_rollout != rollout:
                return None
            if state.previous is not None and state.previous in state.models:
                _, old, model = await self._activate_locked(
                    state.previous, "rolled_back", details, reason
                )
                outcome = "rolled_back"
            else:
                active = state.active
                old = self.host.active
                self.host.set_active(None)
                await asyncio.to_thread(
                    self.registry.update, lambda s: s.deactivated(active, reason, details)
                )
                log.info("model_deactivated", model=active, reason=reason)
                outcome = "deactivated"
        if old is not None and old is not model:
            asyncio.get_running_loop().create_task(self._retire(old))
        return outcome

    async def claim(self, rollout: str | None) -> None:
        """A rollout asks for the model that already serves: from now on the model is that
        rollout's (a release of an older rollout leaves it alone)."""
        async with self._lock:
            await asyncio.to_thread(self.registry.update, lambda s: s.claimed(rollout))

    async def _prepare(
        self, target: ModelTarget, held: CachedModel | None = None
    ) -> tuple[ServingModel, dict[str, float | None]]:
        """The model to serve ``target`` with, verified and health-checked, and the health
        check's figures: ``held`` (a copy loaded on demand) if it serves well, else a new one."""
        if target.role != GENERATION:
            raise ActivationFailed(
                f"{target.ref} is an {target.role} model: it cannot be the active model, which "
                "chats; serve it with the embedding_model setting",
                reason="wrong_role",
            )
        path: Path
        signers: tuple[str, ...]
        path, signers = await self._in_registry_thread(
            lambda cancel: (
                self.registry.verified_path(target, cancel=cancel),
                self.registry.targets_signers(),
            ),
            "verify",
        )
        self._crash_point("activation.verified")
        if held is not None and not held.model.health.degraded:
            # Loaded from these same verified bytes and health-checked then; a second check
            # now would queue behind the requests running on it.
            return held.model, held.health
        available = available_memory_bytes()
        if available is not None and target.min_ram_bytes > available:
            raise ActivationFailed(
                f"{target.ref} needs {target.min_ram_bytes} bytes of memory, {available} available",
                reason="not_enough_memory",
            )
        started = time.perf_counter()
        log.info("model_loading", model=target.ref, format=target.format)
        load = functools.partial(
            load_backend,
            path,
            threads=self.threads,
            context_length=min(self.context_length, target.context_length),
            model_id=target.name,
            gpu_layers=self.gpu_layers,
            onnx_provider=self.onnx_provider,
        )
        # The thread cannot be stopped: a caller that goes away (a client hanging up on an
        # activation) waits for it with the lock held, and what it loaded is closed, not
        # dropped to hold its memory until a garbage collection finds it.
        backend = await run_to_end(asyncio.to_thread(load), _close_backend)
        self.metrics.model_load.labels(target.name).set(time.perf_counter() - started)
        self._crash_point("activation.loaded")
        served = backend.info.context_length
        if served < MIN_CONTEXT_LENGTH:
            # The requested context is capped at the model's trained length, which the
            # signed metadata may not know: a model trained on a few dozen tokens loads,
            # answers its short health check, and then refuses every real chat.
            backend.close()
            raise ActivationFailed(
                f"{target.ref} serves a context of {served} tokens (its trained length); at "
                f"least {MIN_CONTEXT_LENGTH} are needed to hold a chat",
                reason="context_too_small",
            )
        health = FailureStreak()
        scheduler = Scheduler(
            backend,
            max_queue=self.max_queue,
            retry_after_s=self.retry_after_s,
            background_every=self.background_every,
            hooks=self.metrics.scheduler_hooks(target.name).then(
                SchedulerHooks(
                    on_finished=lambda _: health.succeeded(),
                    on_failed=lambda _: health.failed(),
                )
            ),
        )
        model = ServingModel(
            backend,
            scheduler,
            context_length=backend.info.context_length,
            defaults=SamplingDefaults(
                temperature=target.sampling.temperature,
                top_p=target.sampling.top_p,
                top_k=target.sampling.top_k,
            ),
            health=health,
            version=target.version,
            chat_template=target.chat_template,
            default_max_tokens=self.default_max_tokens,
            digest=target.sha256,
            signers=signers,
            presets=target.presets,
        )
        log.info(
            "model_loaded",
            model=target.ref,
            backend=backend.info.backend,
            context_length=backend.info.context_length,
            load_ms=round((time.perf_counter() - started) * 1000, 1),
            **backend.info.accelerator.as_dict(),
        )
        try:
            figures = await self._health_check(model, target)
        except BaseException:
            await scheduler.close()
            backend.close()
            raise
        return model, figures.as_dict()

    async def _health_check(self, model: ServingModel, target: ModelTarget) -> HealthFigures:
        check = target.health_check
        # The check takes the path every request takes (tokenize, fit the context, sample),
        # so a model that passes it can answer a request: one whose context cannot even hold
        # the check's prompt and reply fails here rather than at the first client.
        tokens = await asyncio.to_thread(model.text_prompt, check.prompt)
        try:
            params = model.sampling(
                SamplingFields(max_tokens=check.max_tokens, temperature=0.0), len(tokens)
            )
        except RequestError as exc:
            raise ActivationFailed(
                f"health check cannot run: {exc}", reason="health_check_invalid"
            ) from exc
        request = GenerationRequest(tuple(tokens), params, request_id="health-check")
        finished: Finished | None = None
        started = time.perf_counter()
        first_token_s: float | None = None
        try:
            async with asyncio.timeout(check.timeout_s):
                async for batch in model.scheduler.generate(request):
                    if first_token_s is None and isinstance(batch[0], TextDelta):
                        first_token_s = time.perf_counter() - started
                    last = batch[-1]
                    if isinstance(last, Finished):
                        finished = last
        except TimeoutError as exc:
            raise ActivationFailed(
                f"health check did not finish within {check.timeout_s} s",
                reason="health_check_timeout",
            ) from exc
        except ModelError as exc:
            raise ActivationFailed(
                f"health check failed: {exc}", reason="health_check_error"
            ) from exc
        assert finished is not None
        if finished.completion_tokens == 0:
            raise ActivationFailed("health check generated no tokens", reason="no_tokens")
        speed = finished.tokens_per_s
        if check.min_tokens_per_s > 0 and (speed or 0) < check.min_tokens_per_s:
            raise ActivationFailed(
                f"health check ran at {speed or 0:.1f} tokens/s, below the "
                f"{check.min_tokens_per_s} tokens/s the model requires",
                reason="health_check_too_slow",
            )
        ttft = first_token_s if first_token_s is not None else finished.prefill_s
        return HealthFigures(tokens_per_s=speed, ttft_ms=round(ttft * 1000, 2))

    async def _retire(self, model: ServingModel) -> None:
        """Close a replaced model once the requests still on it are done."""
        await model.scheduler.drain()
        await model.scheduler.close()
        model.backend.close()
        log.info("model_retired", model=model.model_id, version=model.version)

    async def close(self, registry_wait_s: float = REGISTRY_STOP_WAIT_S) -> None:
        """Close the models, and stop registry work: it is asked to stop, and waited for a
        bounded time; a thread stuck for good is left to the process's exit."""
        await self.cache.close()
        for model in self.host.models():
            await model.scheduler.close()
            model.backend.close()
        self.host.set_active(None)
        if self._running_cancel is not None:
            self._running_cancel.set()
        if not await asyncio.to_thread(self._registry_thread.shutdown, registry_wait_s):
            log.error("registry_thread_stuck", timeout_s=registry_wait_s)


@dataclass(frozen=True)
class HealthFigures:
    """How fast the model answered its health check on this device: rollouts compare these
    with the previous model's on the same hardware class."""

    tokens_per_s: float | None
    ttft_ms: float | None

    def as_dict(self) -> dict[str, float | None]:
        speed = None if self.tokens_per_s is None else round(self.tokens_per_s, 2)
        return {"tokens_per_s": speed, "ttft_ms": self.ttft_ms}


def _close_backend(backend: Backend) -> None:
    backend.close()


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo: what a new model may take without swapping out the
    running one. ``None`` where the kernel does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
