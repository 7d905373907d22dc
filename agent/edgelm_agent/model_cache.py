"""Load other installed models on demand beside the active one, within ``ram_budget_bytes``.

The thin shell around :mod:`edgelm_agent.residency`: it takes a lease on a model for every
request (loading the model first if it is installed but not in memory), asks the policy what
to unload to make room, and unloads models whose keep-alive has run out. Decisions are the
policy's; this module only does them.

* **Leases.** A request holds its model's lease from before its prompt is tokenized until its
  last byte is sent, so a model is never unloaded under a running generation: the policy
  skips leased models, and a load that can only make room by unloading one waits until a
  lease comes back.
* **One load at a time.** Loads (and unloads) take turns on one lock, and a load runs the
  activation's own steps (verify, load, health check) under the model manager's lock, so no
  import, gc or activation runs beside it. At most ``max_queue`` requests wait for one model
  to load; one more is a 429, as on a busy model.
* **Pinned.** The active model and the embedding model are counted in the budget but never
  unloaded here: the active model is what the device is for (a kiosk's chat must not pay a
  reload after a quiet hour), and the activation and the embedding loader own them.
* **Budget 0** (the default) keeps the agent as it was: only the active model serves, and a
  request for any other model is a 404.
* **A load, once begun, ends.** A client that hangs up while its model loads does not stop
  the load: a runtime's load cannot be interrupted, and a copy dropped halfway would hold its
  memory outside the budget (or be loaded twice by the retry). The load finishes under the
  lock, the model is kept, counted, and unloaded when idle like any other. An unload, once
  begun, likewise closes the model even if whoever began it is cancelled.
* **One copy of a model.** An activation of a model loaded on demand takes that copy over
  (:meth:`ModelCache.hold`, :meth:`ModelCache.adopt`) rather than load a second one beside it,
  and a load that finds its model became the active one meanwhile loads nothing. Every copy
  the cache holds counts against the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import structlog

from edgelm_agent.embedding_model import EmbeddingModel
from edgelm_agent.errors import ModelNotFound, NotReady, QueueFull, WrongModelRole
from edgelm_agent.inference.gguf_shape import read_shape
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.registry.bundle import parse_manifest
from edgelm_agent.registry.errors import ModelNotInstalled
from edgelm_agent.registry.model_target import GENERATION, ModelTarget
from edgelm_agent.registry.registry import Registry
from edgelm_agent.residency import (
    InsufficientMemory,
    ModelShape,
    MustWait,
    Resident,
    estimate_bytes,
    expired,
    next_expiry,
    plan_load,
    plan_trim,
)
from edgelm_agent.serving import ModelHost, ServingModel

log = structlog.get_logger(__name__)
T = TypeVar("T")


class _Default:
    """The request set no ``keep_alive``: the ``idle_unload_s`` setting applies."""


DEFAULT_KEEP_ALIVE: Final = _Default()
KeepAlive = float | None | _Default


def ref_of(model: ServingModel | EmbeddingModel) -> str:
    """``name@version`` of a model in memory, as the registry names its target."""
    return f"{model.model_id}@{model.version}"


async def run_to_end(work: Awaitable[T], abandoned: Callable[[T], None] | None = None) -> T:
    """Await ``work`` in a task of its own that a cancellation of the caller does not stop.

    Cancelled, the caller still waits for the work to end, so a lock it holds covers the whole
    of it, and then the cancellation goes on up; what the work returns then is handed to
    ``abandoned`` (a backend to close, a lease to give back) instead of being dropped. A second
    cancellation (the shutdown's) ends the wait; ``abandoned`` still gets the result later.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(functools.partial(_settle, abandoned))
        await asyncio.wait({task})
        raise


def _settle(abandoned: Callable[[T], None] | None, task: asyncio.Future[T]) -> None:
    if task.cancelled():
        return
    error = task.exception()  # retrieved, so asyncio does not log it as never seen
    if error is None and abandoned is not None:
        abandoned(task.result())


@dataclass(frozen=True)
class Loaded:
    """A model the load function brought up beside the active one."""

    model: ServingModel
    #: Its health check's figures (``tokens_per_s``, ``ttft_ms``): an activation that takes
    #: this copy over records them, as it records those of a copy it loads itself.
    health: dict[str, float | None] = field(default_factory=dict)


@dataclass
class CachedModel:
    """A model loaded on demand, with what the policy needs to know about it."""

    target: ModelTarget
    model: ServingModel
    size_bytes: int
    last_used_s: float
    leases: int = 0
    expires_at_s: float | None = None
    #: Why it goes when it expires: ``keep_alive`` (a request asked), ``idle``, or
    #: ``activated`` (a copy of the model that has since become the active one).
    expiry: str = "idle"
    health: dict[str, float | None] = field(default_factory=dict)

    def resident(self) -> Resident:
        return Resident(
            self.target.ref,
            self.size_bytes,
            self.last_used_s,
            leases=self.leases,
            expires_at_s=self.expires_at_s,
        )


class ModelCache:
    def __init__(
        self,
        host: ModelHost,
        registry: Registry,
        metrics: AgentMetrics,
        *,
        load: Callable[[ModelTarget], Awaitable[Loaded | None]],
        budget_bytes: int,
        idle_unload_s: float | None,
        context_length: int,
        max_queue: int,
        retry_after_s: int,
        available_bytes: Callable[[], int | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.registry = registry
        self.metrics = metrics
        self.budget_bytes = budget_bytes
        self.idle_unload_s = idle_unload_s
        self.context_length = context_length
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._load_model = load
        self._available_bytes = available_bytes
        self._clock = clock
        self._entries: dict[str, CachedModel] = {}
        self._sizes: dict[str, int] = {}  # estimates by ref: a target never changes
        self._waiting: dict[str, int] = {}
        self._lock = asyncio.Lock()  # one load or unload at a time
        self._lease_returned = asyncio.Event()
        self._changed = asyncio.Event()
        self._idle_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def loaded(self) -> list[CachedModel]:
        return list(self._entries.values())

    # --- leases ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self, name: str, keep_alive: KeepAlive = DEFAULT_KEEP_ALIVE
    ) -> AsyncIterator[None]:
        """Hold ``name``'s model in memory for the body of the block, loading it first if it is
        installed and not loaded. Names it cannot serve pass through untouched: the request's
        own lookup then answers 404 or 503 as it always did."""
        entry = await self._take(name)
        try:
            yield
        finally:
            if entry is not None:
                self._give_back(entry, keep_alive)

    async def _take(self, name: str) -> CachedModel | None:
        host = self.host
        if host.draining or host.active is None:
            return None
        try:
            model = host.find(name)
        except (ModelNotFound, WrongModelRole):
            model = None
        if model is not None:
            entry = next((e for e in self._entries.values() if e.model is model), None)
            if entry is not None:
                entry.leases += 1  # no await since the lookup: it cannot have gone meanwhile
            return entry
        if not self.enabled:
            return None
        try:
            target = await asyncio.to_thread(self.registry.find, name)
        except ModelNotInstalled:
            return None
        if target.role != GENERATION:
            return None
        return await self._ensure(target)

    def _give_back(self, entry: CachedModel, keep_alive: KeepAlive) -> None:
        entry.leases -= 1
        now = self._clock()
        entry.last_used_s = now
        keep = self.idle_unload_s if isinstance(keep_alive, _Default) else keep_alive
        entry.expires_at_s = None if keep is None else now + keep
        entry.expiry = "idle" if isinstance(keep_alive, _Default) else "keep_alive"
        self._returned(entry)

    def _returned(self, entry: CachedModel) -> None:
        if self._is_active(entry.target.ref) and self._entries.get(entry.target.ref) is entry:
            # A copy the active model does not use (the activation loaded its own, as it
            # must when this one was failing): nothing reaches it any more, so it goes now,
            # whatever keep_alive said, rather than hold its memory for good.
            entry.expires_at_s, entry.expiry = self._clock(), "activated"
        self._lease_returned.set()
        self._lease_returned = asyncio.Event()
        self._changed.set()

    def _is_active(self, ref: str) -> bool:
        active = self.host.active
        return active is not None and ref_of(active) == ref

    # --- the activation takes a copy over --------------------------------------------------------

    def hold(self, ref: str) -> CachedModel | None:
        """The copy of ``ref`` loaded on demand, if any, with a lease taken so that nothing
        unloads it while an activation checks it; give it back with :meth:`release`, or hand
        it over with :meth:`adopt`."""
        entry = self._entries.get(ref)
        if entry is not None:
            entry.leases += 1
        return entry

    def release(self, entry: CachedModel) -> None:
        """The activation that held ``entry`` did not take it over: it serves on demand on,
        with the keep-alive its requests gave it."""
        entry.leases -= 1
        self._returned(entry)

    def adopt(self, entry: CachedModel) -> None:
        """Hand a held copy over to the activation, which makes it the active model: it
        leaves the cache (and the budget's evictable models) without being unloaded, and the
        requests running on it finish there."""
        if self._entries.get(entry.target.ref) is entry:
            del self._entries[entry.target.ref]
        self.host.remove_extra(entry.model)
        log.info("model_adopted", model=entry.target.ref, size_bytes=entry.size_bytes)

    # --- loading --------------------------------------------------------------------------------

    async def _ensure(self, target: ModelTarget) -> CachedModel | None:
        """``target`` loaded, with a lease taken for the caller; ``None`` if it became the
        active model meanwhile (which needs no lease)."""
        ref = target.ref
        waiting = self._waiting.get(ref, 0)
        if waiting >= self.max_queue:
            raise QueueFull(
                f"model {ref} is loading and {waiting} requests already wait for it",
                retry_after_s=self.retry_after_s,
            )
        self._waiting[ref] = waiting + 1
        try:
            # A caller that goes away (a client hanging up) leaves the load to finish; the
            # lease taken for it is given back, so the model then stays only while idle.
            return await run_to_end(self._ensure_locked(target), self._abandoned)
        finally:
            self._waiting[ref] -= 1
            if not self._waiting[ref]:
                del self._waiting[ref]

    async def _ensure_locked(self, target: ModelTarget) -> CachedModel | None:
        async with self._lock:
            if self._closed:
                raise NotReady("the agent is shutting down", retry_after_s=5)
            entry = self._entries.get(target.ref)
            if entry is None:
                entry = await self._load(target)
            if entry is not None:
                entry.leases += 1
            return entry

    def _abandoned(self, entry: CachedModel | None) -> None:
        if entry is not None:
            self._give_back(entry, DEFAULT_KEEP_ALIVE)

    async def _load(self, target: ModelTarget) -> CachedModel | None:
        if self._is_active(target.ref):
            return None  # activated while this request waited for the lock
        size = await self.estimate(target)
        while True:
            residents = await self.residents()
            try:
                plan = plan_load(self.budget_bytes, residents, target.ref, size)
            except InsufficientMemory as exc:
                self.metrics.model_loads.labels("refused").inc()
                log.warning(
                    "model_load_refused",
                    model=target.ref,
                    needed_bytes=exc.needed_bytes,
                    budget_bytes=exc.budget_bytes,
                    kept=exc.loaded,
                )
                raise
            if isinstance(plan, MustWait):
                await self._lease_returned.wait()  # a busy model finishes its request: plan again
            elif plan.unload:
                # One at a time, then plan again: a request may have taken a lease on the
                # next one while this one was closing.
                await self._unload(plan.unload[0], "lru")
            else:
                break
        available = self._available_bytes()
        if available is not None and size > available:
            # The budget is the operator's word; the kernel has the last one. Better a 503
            # now than the OOM killer taking the whole agent halfway through the load.
            self.metrics.model_loads.labels("refused").inc()
            log.warning(
                "model_load_refused", model=target.ref, needed_bytes=size, available_bytes=available
            )
            raise InsufficientMemory(
                target.ref, needed_bytes=size, budget_bytes=available, loaded={}
            )
        try:
            loaded = await self._load_model(target)
        except BaseException:
            self.metrics.model_loads.labels("failed").inc()
            raise
        if loaded is None:
            return None  # the activation loaded it as the active model first
        if self._closed:  # the agent began to stop while the model loaded
            await loaded.model.scheduler.close()
            loaded.model.backend.close()
            raise NotReady("the agent is shutting down", retry_after_s=5)
        entry = CachedModel(target, loaded.model, size, self._clock(), health=loaded.health)
        self._entries[target.ref] = entry
        self.host.add_extra(loaded.model)
        self.metrics.model_loads.labels("loaded").inc()
        self.metrics.models_loaded.set(len(self.host.models()))
        self._start_idle_task()
        return entry

    async def estimate(self, target: ModelTarget) -> int:
        """Bytes ``target`` takes loaded (see :func:`edgelm_agent.residency.estimate_bytes`)."""
        size = self._sizes.get(target.ref)
        if size is None:
            size = estimate_bytes(
                file_bytes=await asyncio.to_thread(self._model_bytes, target),
                context_length=min(self.context_length, target.context_length),
                shape=await asyncio.to_thread(self._shape, target),
                min_ram_bytes=target.min_ram_bytes,
            )
            self._sizes[target.ref] = size
        return size

    def _model_bytes(self, target: ModelTarget) -> int:
        """The bytes of the model's files: an ONNX folder's signed length is that of its
        manifest, a few hundred bytes, so its members' lengths are summed from it."""
        if not target.is_bundle:
            return target.length
        manifest = self.registry.blobs.blob_path(target.sha256).read_bytes()
        return sum(member.length for member in parse_manifest(manifest))

    def _shape(self, target: ModelTarget) -> ModelShape | None:
        if target.format != "gguf":
            return None
        return read_shape(self.registry.blobs.blob_path(target.sha256))

    async def residents(self) -> list[Resident]:
        """Everything in memory: the pinned models, then every copy loaded on demand (one of
        the active model's too, should it hold one: it takes memory all the same)."""
        pinned: list[Resident] = []
        served = [self.host.active, self.host.embeddings.model]
        refs = [ref_of(m) for m in served if m is not None]
        if refs:
            models = (await asyncio.to_thread(self.registry.state)).models
            for ref in refs:
                target = models.get(ref)
                size = await self.estimate(target) if target is not None else 0
                pinned.append(Resident(ref, size, 0.0, pinned=True))
        return pinned + [e.resident() for e in self._entries.values()]

    async def runnable_names(self) -> tuple[str, ...]:
        """The model names a queued job may name and run now: those of the models in memory
        and, with a budget, of every installed chat model (its job loads it, as a request
        would). Nothing while no model is active or the agent stops."""
        host = self.host
        if host.active is None or host.draining:
            return ()
        names = [name for model in host.models() for name in model.names]
        if self.enabled:
            installed = (await asyncio.to_thread(self.registry.state)).models.values()
            names += [n for t in installed if t.role == GENERATION for n in (t.name, t.ref)]
        return tuple(dict.fromkeys(names))

    # --- unloading ------------------------------------------------------------------------------

    async def _unload(self, ref: str, reason: str, *, force: bool = False) -> bool:
        """Unload ``ref``'s copy; whether it did. A copy that is gone already (adopted by an
        activation) or that a request took a lease on since the caller looked stays, unless
        ``force`` (the shutdown: what still runs is stopped, not waited for)."""
        entry = self._entries.get(ref)
        if entry is None or (entry.leases and not force):
            return False
        del self._entries[ref]
        self.host.remove_extra(entry.model)
        self.metrics.model_unloads.labels(reason).inc()
        self.metrics.models_loaded.set(len(self.host.models()))
        log.info("model_unloaded", model=ref, reason=reason, size_bytes=entry.size_bytes)
        # The entry is off the books: it must be closed whatever happens to the caller.
        await run_to_end(self._close(entry.model, drain=not force))
        return True

    @staticmethod
    async def _close(model: ServingModel, *, drain: bool) -> None:
        if drain:  # nothing runs (no lease), but be exact about it
            await model.scheduler.drain()
        await model.scheduler.close()
        model.backend.close()

    async def trim(self) -> None:
        """After the active model changed: unload what no longer fits, least recently used
        first, and a copy of the model that is now the active one."""
        async with self._lock:
            active = self.host.active
            if active is not None and ref_of(active) in self._entries:
                await self._unload(ref_of(active), "activated")
            if self.enabled:
                for ref in plan_trim(self.budget_bytes, await self.residents()):
                    await self._unload(ref, "lru")

    def _start_idle_task(self) -> None:
        if self._idle_task is None or self._idle_task.done():
            self._idle_task = asyncio.get_running_loop().create_task(
                self._unload_idle(), name="model-idle-unload"
            )

    async def _unload_idle(self) -> None:
        """Unload each model loaded on demand once its keep-alive has run out."""
        while True:
            self._changed.clear()  # before looking: a lease returned meanwhile is not lost
            residents = [e.resident() for e in self._entries.values()]
            if expired(residents, self._clock()):
                async with self._lock:
                    # Looked at again under the lock, one at a time: a request may take a
                    # lease on a model, and so keep it, while another one closes.
                    due = expired([e.resident() for e in self._entries.values()], self._clock())
                    if due:
                        await self._unload(due[0], self._entries[due[0]].expiry)
                continue
            at = next_expiry(residents)
            wait_s = None if at is None else max(0.0, at - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._changed.wait()

    async def close(self) -> None:
        """Unload every model loaded on demand (at shutdown); a load still running unloads
        its model itself when it ends."""
        self._closed = True
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
        for ref in list(self._entries):
            # After the shutdown grace: what still runs is stopped, not waited for.
            await self._unload(ref, "shutdown", force=True)
