"""Which models stay in memory: a pure policy over a RAM budget, least recently used first.

The agent keeps its active model (and its embedding model) loaded for good, and loads other
installed models on demand beside them while they fit in ``ram_budget_bytes``. This module
decides; :mod:`edgelm_agent.model_cache` does the loading and unloading. Nothing here reads a
clock, a file or the registry: callers pass the residents, the time and the sizes in.

Rules of :func:`plan_load`, each a property its tests check:

* the models it keeps, plus the wanted one, never exceed the budget;
* it never unloads a pinned model (the active and the embedding model), nor one with a
  request in flight (a lease);
* it unloads the least recently used first, and no more than it must;
* when even unloading every model it may unload cannot make room, it refuses with
  :class:`InsufficientMemory`; when only models that are busy now stand in the way, it says
  :class:`MustWait`, and the caller plans again once a lease is returned.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgelm_agent.errors import InvalidRequest, ModelError, shown


class InsufficientMemory(ModelError):
    """A model does not fit in the RAM budget (or in the memory the kernel has free), even with
    every model that may be unloaded gone. 503 ``insufficient_memory``, with the figures."""

    code = "insufficient_memory"

    def __init__(
        self, model: str, *, needed_bytes: int, budget_bytes: int, loaded: Mapping[str, int]
    ) -> None:
        held = sum(loaded.values())
        kept = ", ".join(f"{ref} ({size} bytes)" for ref, size in sorted(loaded.items()))
        super().__init__(
            f"model {model} needs about {needed_bytes} bytes of memory; the budget is "
            f"{budget_bytes} bytes and {held} are held by models that stay loaded"
            + (f": {kept}" if kept else "")
        )
        self.model = model
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        #: The models that could not be unloaded to make room, with their sizes.
        self.loaded = dict(loaded)


@dataclass(frozen=True)
class Resident:
    """A model in memory, as the policy sees it."""

    ref: str
    size_bytes: int
    #: When its last request ended (or it was loaded): the LRU order.
    last_used_s: float
    #: Requests running on it now; it is never unloaded while this is above 0.
    leases: int = 0
    #: The active model and the embedding model: never unloaded by this policy.
    pinned: bool = False
    #: When it goes if no request comes (``keep_alive``, ``idle_unload_s``); ``None``: never.
    expires_at_s: float | None = None

    @property
    def evictable(self) -> bool:
        return not self.pinned and self.leases == 0


@dataclass(frozen=True)
class LoadNow:
    """Unload these (least recently used first), then load."""

    unload: tuple[str, ...]


@dataclass(frozen=True)
class MustWait:
    """Room can be made only by unloading models that are serving requests now: wait for one
    of them to finish, then plan again."""

    busy: tuple[str, ...]


Plan = LoadNow | MustWait


def plan_load(
    budget_bytes: int, residents: Sequence[Resident], wanted: str, wanted_bytes: int
) -> Plan:
    """What to unload so that ``wanted`` (of ``wanted_bytes``) fits in ``budget_bytes``."""
    others = [r for r in residents if r.ref != wanted]
    held = sum(r.size_bytes for r in others)
    if held + wanted_bytes <= budget_bytes:
        return LoadNow(())
    fixed = {r.ref: r.size_bytes for r in others if r.pinned}
    if sum(fixed.values()) + wanted_bytes > budget_bytes:
        raise InsufficientMemory(
            wanted, needed_bytes=wanted_bytes, budget_bytes=budget_bytes, loaded=fixed
        )
    unload: list[str] = []
    for r in sorted((r for r in others if r.evictable), key=lambda r: (r.last_used_s, r.ref)):
        if held + wanted_bytes <= budget_bytes:
            break
        unload.append(r.ref)
        held -= r.size_bytes
    if held + wanted_bytes <= budget_bytes:
        return LoadNow(tuple(unload))
    busy = tuple(sorted(r.ref for r in others if not r.pinned and r.leases > 0))
    return MustWait(busy)


def plan_trim(budget_bytes: int, residents: Sequence[Resident]) -> tuple[str, ...]:
    """Models to unload, least recently used first, to come back within the budget (after the
    active model changed, say); busy and pinned ones stay, even if that is not enough."""
    held = sum(r.size_bytes for r in residents)
    unload: list[str] = []
    for r in sorted((r for r in residents if r.evictable), key=lambda r: (r.last_used_s, r.ref)):
        if held <= budget_bytes:
            break
        unload.append(r.ref)
        held -= r.size_bytes
    return tuple(unload)


def expired(residents: Sequence[Resident], now_s: float) -> tuple[str, ...]:
    """Models whose keep-alive has run out and that nothing uses now."""
    return tuple(
        r.ref
        for r in residents
        if r.evictable and r.expires_at_s is not None and r.expires_at_s <= now_s
    )


def next_expiry(residents: Sequence[Resident]) -> float | None:
    """When the next idle model goes, if any will."""
    times = [r.expires_at_s for r in residents if r.evictable and r.expires_at_s is not None]
    return min(times) if times else None


# --- keep_alive ------------------------------------------------------------------------------

#: The string form, in the dialect both Python and JSON Schema (ECMA-262) read alike: ASCII
#: digits and whitespace only (``\d`` would also take other scripts' digits, which ``float``
#: reads), and at most 15 whole digits, so no duration overflows a float.
KEEP_ALIVE_PATTERN = (
    r"^[ \t\n\r\f\v]*(-?[0-9]{1,15}(?:\.[0-9]+)?)[ \t\n\r\f\v]*(ms|s|m|h)?[ \t\n\r\f\v]*$"
)
_DURATION = re.compile(KEEP_ALIVE_PATTERN)
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_keep_alive(value: object) -> float | None:
    """A request's ``keep_alive``, as Ollama takes it: seconds (a number, or a string with a
    unit: ``"300"``, ``"5m"``, ``"1h"``); 0 unloads the model once the request ends; a
    negative value keeps it loaded for good (``None``)."""
    number: float
    if isinstance(value, bool) or value is None:
        raise _bad_keep_alive(value)
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits: no float holds it
            raise _bad_keep_alive(value) from None
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise _bad_keep_alive(value)
        number = float(match.group(1)) * _UNIT_S[match.group(2)]
    else:
        raise _bad_keep_alive(value)
    if not math.isfinite(number):
        raise _bad_keep_alive(value)
    return None if number < 0 else number


def _bad_keep_alive(value: object) -> InvalidRequest:
    return InvalidRequest(
        '\'keep_alive\' must be seconds (a number) or a duration such as "5m" or "30s"; 0 '
        f"unloads the model after this request, -1 keeps it loaded; got {shown(value)}",
        param="keep_alive",
    )


# --- how much memory a model takes -----------------------------------------------------------

#: Bytes of KV cache per token per layer per key/value head dimension: llama.cpp keeps keys and
#: values (x2) in f16 (2 bytes).
KV_BYTES_PER_ELEMENT = 2 * 2
#: A model whose shape is unknown (ONNX, a GGUF whose header cannot be read) is counted at
#: twice its file size: weights, plus as much again for the cache and the runtime's buffers.
UNKNOWN_SHAPE_FACTOR = 2
#: Scratch buffers beyond the weights and the KV cache (compute graph, tokenizer, threads).
RUNTIME_OVERHEAD_BYTES = 32 << 20


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache's size depends on, from a GGUF header."""

    layers: int
    #: Width of the keys (and of the values) of one token in one layer: kv heads x head size.
    kv_width: int

    def kv_cache_bytes(self, context_length: int) -> int:
        return self.layers * self.kv_width * context_length * KV_BYTES_PER_ELEMENT


def estimate_bytes(
    *,
    file_bytes: int,
    context_length: int,
    shape: ModelShape | None,
    min_ram_bytes: int = 0,
) -> int:
    """Memory a model takes loaded: its file (llama.cpp maps it, and generation touches every
    page) plus its KV cache for the full context plus scratch buffers; or the signed
    ``min_ram`` when that is larger. Conservative on purpose: too high wastes a slot, too low
    risks the OOM killer."""
    if shape is None:
        estimate = file_bytes * UNKNOWN_SHAPE_FACTOR + RUNTIME_OVERHEAD_BYTES
    else:
        estimate = file_bytes + shape.kv_cache_bytes(context_length) + RUNTIME_OVERHEAD_BYTES
    return max(estimate, min_ram_bytes)
