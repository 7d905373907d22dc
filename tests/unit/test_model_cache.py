"""The shell around the residency policy: leases, loads and unloads that a cancellation cannot
cut in half, and the hand-over of a copy loaded on demand to an activation.

The cache runs against a real registry in ``tmp_path`` (holding tiny-llama under the name
``extra``) and loads fake backends, so a test can hold a load or a generation for as long as
it needs without timing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from edgelm_agent.inference.scheduler import Scheduler
from edgelm_agent.inference.types import GenerationRequest, SamplingParams
from edgelm_agent.metrics import AgentMetrics
from edgelm_agent.model_cache import Loaded, ModelCache, run_to_end
from edgelm_agent.registry.model_target import ModelTarget
from edgelm_agent.registry.registry import Registry, RegistryConfig
from edgelm_agent.serving import ModelHost, ServingModel
from tests.agent_process import TINY_GGUF
from tests.fake_backend import FakeBackend

BOUND_S = 30.0  # only bounds a broken test; nothing waits for it to pass


class ClosingBackend(FakeBackend):
    """A fake backend that says whether it was closed, and whose generation can be held
    until the test lets it go, deaf to cancellation as a runtime stuck in one call is."""

    def __init__(self, model_id: str) -> None:
        super().__init__(("a",))
        self._info = dataclasses.replace(self._info, model_id=model_id)
        self.closed = False
        self.held = threading.Event()
        self.let_go = threading.Event()
        self.let_go.set()

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[str]:
        self.held.set()
        self.let_go.wait(BOUND_S)
        yield "a"

    def close(self) -> None:
        self.closed = True


def serving(model_id: str, version: str) -> ServingModel:
    backend = ClosingBackend(model_id)
    return ServingModel(
        backend,
        Scheduler(backend, max_queue=4, retry_after_s=1),
        context_length=64,
        version=version,
    )


class Loads:
    """The cache's load function: fake models, each load held until the test allows it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.allowed = asyncio.Event()
        self.allowed.set()
        self.count = 0
        self.as_none = False

    async def __call__(self, target: ModelTarget) -> Loaded | None:
        self.count += 1
        self.started.set()
        await self.allowed.wait()
        if self.as_none:
            return None
        return Loaded(serving(target.name, target.version), {"tokens_per_s": 1.0})


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(RegistryConfig(root=tmp_path / "registry"))
    registry.import_model(TINY_GGUF, name="extra", version="1")
    return registry


@pytest.fixture
def loads() -> Loads:
    return Loads()


@pytest.fixture
async def cache(registry: Registry, loads: Loads) -> AsyncIterator[ModelCache]:
    host = ModelHost()
    host.set_active(serving("chat", "1"))
    cache = ModelCache(
        host,
        registry,
        AgentMetrics(),
        load=loads,
        budget_bytes=1 << 40,
        idle_unload_s=None,
        context_length=4096,
        max_queue=4,
        retry_after_s=1,
        available_bytes=lambda: None,
    )
    yield cache
    await cache.close()


async def until(check: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``check`` holds."""
    async with asyncio.timeout(BOUND_S):
        while not check():
            await asyncio.sleep(0.005)
    assert check(), what


async def lease_once(cache: ModelCache, name: str = "extra") -> None:
    async with cache.lease(name):
        pass


def backend_of(model: ServingModel) -> ClosingBackend:
    backend = model.backend
    assert isinstance(backend, ClosingBackend)
    return backend


class TestRunToEnd:
    async def test_a_cancelled_caller_waits_for_the_work_and_hands_its_result_on(self):
        """Cancelling the caller does not stop the work: the caller still waits for it,
        then is cancelled, and what the work returned goes to ``abandoned``."""
        gate, handed = asyncio.Event(), list[str]()

        async def work() -> str:
            await gate.wait()
            return "result"

        caller = asyncio.ensure_future(run_to_end(work(), handed.append))
        await asyncio.sleep(0)
        caller.cancel()
        await asyncio.sleep(0.01)
        assert not caller.done()  # still waiting for the work
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert handed == ["result"]

    async def test_a_second_cancellation_ends_the_wait_and_the_work_still_ends(self):
        """The shutdown's second cancellation stops the wait, not the work."""
        gate, handed = asyncio.Event(), list[str]()

        async def work() -> str:
            await gate.wait()
            return "result"

        caller = asyncio.ensure_future(run_to_end(work(), handed.append))
        await asyncio.sleep(0)
        caller.cancel()
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert handed == []
        gate.set()
        await until(lambda: handed == ["result"], "the work handed its result on")

    async def test_without_a_cancellation_it_is_the_work(self):
        """Uncancelled, it returns what the work returns and raises what it raises."""

        async def fails() -> None:
            raise ValueError("boom")

        assert await run_to_end(asyncio.sleep(0, "x")) == "x"
        with pytest.raises(ValueError, match="boom"):
            await run_to_end(fails())


class TestLoadsCannotBeCutInHalf:
    async def test_a_lease_abandoned_mid_load_leaves_the_model_loaded_and_idle(
        self, cache: ModelCache, loads: Loads
    ):
        """A request that goes away while its model loads leaves the load to finish: the
        model is kept, without a lease, and the next request uses it with no second load."""
        loads.allowed.clear()
        request = asyncio.ensure_future(lease_once(cache))
        await loads.started.wait()
        request.cancel()
        await asyncio.sleep(0.01)
        loads.allowed.set()
        with pytest.raises(asyncio.CancelledError):
            await request
        [entry] = cache.loaded()
        assert entry.leases == 0
        assert entry.model in cache.host.models()
        await lease_once(cache)
        assert loads.count == 1

    async def test_a_load_that_finds_its_model_activated_loads_nothing(
        self, cache: ModelCache, loads: Loads
    ):
        """When the model became the active one while the request waited, the request runs
        on the active model: nothing is cached, nothing leased."""
        loads.as_none = True
        await lease_once(cache)
        assert cache.loaded() == []
        assert cache.host.models() == [cache.host.active]

    async def test_an_unload_whose_caller_is_cancelled_still_closes_the_model(
        self, cache: ModelCache
    ):
        """Cancelled while it drains a model it took off the books, a trim still closes
        that model before it ends: no copy is left open outside the budget."""
        await lease_once(cache)
        [entry] = cache.loaded()
        backend = backend_of(entry.model)
        backend.let_go.clear()
        request = GenerationRequest(
            (1, 2), SamplingParams(max_tokens=1, temperature=0.0), request_id="r"
        )
        running = asyncio.ensure_future(_drain(entry.model.scheduler.generate(request)))
        await asyncio.to_thread(backend.held.wait, BOUND_S)
        cache.budget_bytes = 1  # the active model grew: the extra one must go
        trim = asyncio.ensure_future(cache.trim())
        await until(lambda: cache.loaded() == [], "the extra model taken off the books")
        trim.cancel()
        await asyncio.sleep(0.01)
        closed_while_held = backend.closed
        backend.let_go.set()
        with pytest.raises(asyncio.CancelledError):
            await trim
        assert not closed_while_held  # it waited for the generation, as a drain must
        assert backend.closed
        await running


async def _drain(batches: AsyncIterator[object]) -> None:
    async for _ in batches:
        pass


class TestActivationTakesACopyOver:
    async def test_a_held_copy_is_leased_and_an_adopted_one_leaves_unclosed(
        self, cache: ModelCache
    ):
        """hold() leases the copy so nothing unloads it; adopt() takes it out of the cache
        and its extras without closing it, for the activation to serve."""
        assert cache.hold("extra@1") is None
        await lease_once(cache)
        held = cache.hold("extra@1")
        assert held is not None
        assert held.leases == 1
        with capture_logs() as logs:
            cache.adopt(held)
        assert cache.loaded() == []
        assert held.model not in cache.host.models()
        assert not backend_of(held.model).closed
        assert [e["event"] for e in logs] == ["model_adopted"]

    async def test_a_copy_released_by_a_failed_activation_serves_on_as_it_was(
        self, cache: ModelCache
    ):
        """An activation that did not take the copy over gives its lease back without
        touching the keep-alive its requests gave it."""
        async with cache.lease("extra", keep_alive=None):  # keep_alive -1: kept for good
            pass
        held = cache.hold("extra@1")
        assert held is not None
        cache.release(held)
        assert (held.leases, held.expires_at_s, held.expiry) == (0, None, "keep_alive")
        assert cache.loaded() == [held]

    async def test_a_copy_the_active_model_does_not_use_goes_when_its_lease_returns(
        self, cache: ModelCache
    ):
        """A copy of the model that has since become the active one (the activation loaded
        its own) is unloaded once its last request ends, even kept alive for good."""
        async with cache.lease("extra"):
            [entry] = cache.loaded()
            cache.host.set_active(serving("extra", "1"))  # the activation's own copy
        with capture_logs() as logs:
            await until(lambda: cache.loaded() == [], "the unused copy unloaded")
            await until(lambda: backend_of(entry.model).closed, "and closed")
        [unloaded] = [e for e in logs if e["event"] == "model_unloaded"]
        assert unloaded["reason"] == "activated"

    async def test_every_copy_counts_against_the_budget(self, cache: ModelCache):
        """A copy sharing the active model's name and version is counted beside it."""
        await lease_once(cache)
        cache.host.set_active(serving("extra", "1"))
        residents = await cache.residents()
        assert [(r.ref, r.pinned) for r in residents] == [("extra@1", True), ("extra@1", False)]
        assert residents[0].size_bytes == residents[1].size_bytes > 0


class TestJobNames:
    async def test_with_a_budget_installed_chat_models_are_runnable(self, cache: ModelCache):
        """Jobs may name the active model or any installed chat model, by name or ref."""
        assert set(await cache.runnable_names()) == {"chat", "chat@1", "extra", "extra@1"}

    async def test_without_a_budget_only_the_models_in_memory(self, cache: ModelCache):
        """Budget 0: only the active model's names; none while the agent stops."""
        cache.budget_bytes = 0
        assert await cache.runnable_names() == ("chat", "chat@1")
        cache.host.draining = True
        assert await cache.runnable_names() == ()
