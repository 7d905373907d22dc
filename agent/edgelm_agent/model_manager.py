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
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from edgelm_agent.errors import EdgelmError, ModelError, RequestError
from edgelm_agent.inference.loader import load_backend
from edgelm_agent.inference.scheduler import Scheduler, SchedulerHooks
from edgelm_agent.inference.types import (
    Finished,
    GenerationRequest,
    SamplingDefaults,
    SamplingFields,
)
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.registry.errors import ActivationFailed, ModelNotInstalled
from edgelm_agent.registry.model_target import ModelTarget
from edgelm_agent.registry.registry import Registry
from edgelm_agent.serving import FailureStreak, ModelHost, ServingModel

log = structlog.get_logger(__name__)
CrashPoint = Callable[[str], None]
T = TypeVar("T")


def _no_crash(point: str) -> None:
    pass


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
        crash_point: CrashPoint = _no_crash,
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
        self._lock = asyncio.Lock()  # one activation at a time

    async def start(self) -> None:
        """Serve the recorded active model, or the previous one if it no longer verifies."""
        state = self.registry.state()
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

    async def activate(self, ref: str, *, event: str = "activated") -> ModelTarget:
        async with self._lock:
            target = self.registry.find(ref)
            try:
                model = await self._prepare(target)
            except EdgelmError as exc:
                reason = str(exc)
                self.registry.save(self.registry.state().activation_failed(target.ref, reason))
                log.error("activation_failed", model=target.ref, reason=reason)
                if isinstance(exc, ActivationFailed):
                    raise
                raise ActivationFailed(
                    f"{target.ref} was not activated: {reason}", reason=reason
                ) from exc
            old = self.host.active
            self._crash_point("activation.before_switch")
            self.host.set_active(model)
            state = self.registry.state()
            if event == "rolled_back":
                state = state.rolled_back(target.ref, "requested")
            elif state.active != target.ref:
                state = state.activated(target.ref)
            self.registry.save(state)
            self._crash_point("activation.after_commit")
            log.info("model_activated", model=target.ref, how=event)
        if old is not None and old is not model:
            asyncio.get_running_loop().create_task(self._retire(old))
        return target

    async def known_models(self) -> set[str]:
        """Models that are served, installed, or offered by the trusted repository."""
        served = {m.model_id for m in self.host.models()}
        return served | await asyncio.to_thread(self.registry.known_names)

    async def exclusive(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking registry change in a thread, never beside an activation."""
        async with self._lock:
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def rollback(self) -> ModelTarget:
        previous = self.registry.state().previous
        if previous is None:
            raise ModelNotInstalled("there is no previous model to roll back to")
        return await self.activate(previous, event="rolled_back")

    async def _prepare(self, target: ModelTarget) -> ServingModel:
        path: Path = await asyncio.to_thread(self.registry.verified_path, target)
        self._crash_point("activation.verified")
        available = available_memory_bytes()
        if available is not None and target.min_ram_bytes > available:
            raise ActivationFailed(
                f"{target.ref} needs {target.min_ram_bytes} bytes of memory, {available} available",
                reason="not_enough_memory",
            )
        started = time.perf_counter()
        log.info("model_loading", model=target.ref, format=target.format)
        backend = await asyncio.to_thread(
            load_backend,
            path,
            threads=self.threads,
            context_length=min(self.context_length, target.context_length),
            model_id=target.name,
            gpu_layers=self.gpu_layers,
            onnx_provider=self.onnx_provider,
        )
        self.metrics.model_load.labels(target.name).set(time.perf_counter() - started)
        self._crash_point("activation.loaded")
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
            await self._health_check(model, target)
        except BaseException:
            await scheduler.close()
            backend.close()
            raise
        return model

    async def _health_check(self, model: ServingModel, target: ModelTarget) -> None:
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
        try:
            async with asyncio.timeout(check.timeout_s):
                async for batch in model.scheduler.generate(request):
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

    async def _retire(self, model: ServingModel) -> None:
        """Close a replaced model once the requests still on it are done."""
        await model.scheduler.drain()
        await model.scheduler.close()
        model.backend.close()
        log.info("model_retired", model=model.model_id, version=model.version)

    async def close(self) -> None:
        for model in self.host.models():
            await model.scheduler.close()
            model.backend.close()
        self.host.set_active(None)


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


def crash_point_from(name: str | None) -> CrashPoint:
    """For the kill -9 tests: a process that dies at the named point, as if killed there."""
    if not name:
        return _no_crash

    def crash(point: str) -> None:
        if point == name:
            log.warning("crash_point_reached", point=point)
            os.kill(os.getpid(), signal.SIGKILL)

    return crash
