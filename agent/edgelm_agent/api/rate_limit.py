"""Per-client limits on the HTTP listener: a token bucket for the request rate, and a cap on
requests in flight. Pure: the caller passes the clock, so tests need no sleeping.

A client is whoever :func:`client_key` says: the bearer token it presents (hashed, never kept
in clear), else its peer address. One runaway kiosk app then empties its own bucket and fills
its own slots, and gets 429 with ``Retry-After``; the others keep theirs.

Why not a library: ``limits`` (and ``aiohttp-ratelimiter`` on top of it) counts fixed or moving
windows, has no token bucket and no concurrency cap; ``aiolimiter`` makes callers *wait* for
capacity rather than refuse them. What we need is forty lines, and here it is pure.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class ClientLimits:
    """What each HTTP client may do. ``rate_per_s == 0`` turns the rate limit off;
    ``max_concurrent == 0`` turns the concurrency cap off."""

    rate_per_s: float = 20.0
    burst: int = 40
    max_concurrent: int = 4
    #: Clients remembered at once; beyond it, idle ones are forgotten (they start full).
    max_clients: int = 4096


@dataclass
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate_per_s``; each request takes one."""

    rate_per_s: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate_per_s: float, burst: float, now: float) -> TokenBucket:
        return cls(rate_per_s, burst, burst, now)

    def _refill(self, now: float) -> None:
        if now > self.updated:  # a clock that steps back never takes tokens away
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
            self.updated = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there is."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


@dataclass(frozen=True)
class Refusal:
    """Why a client was refused, and when to come back (whole seconds, at least 1)."""

    reason: str  # "rate" or "concurrency"
    retry_after_s: int


class ClientLimiter:
    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._inflight: dict[str, int] = {}

    def admit(self, client: str, now: float) -> Refusal | None:
        """Admit one request of ``client`` (then :meth:`release` it when done), or refuse."""
        limits = self.limits
        if limits.max_concurrent and self._inflight.get(client, 0) >= limits.max_concurrent:
            return Refusal("concurrency", 1)
        if limits.rate_per_s > 0:
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = TokenBucket.full(limits.rate_per_s, limits.burst, now)
                self._buckets[client] = bucket
                self._forget_idle(now)
            self._buckets.move_to_end(client)
            wait_s = bucket.take(now)
            if wait_s > 0:
                return Refusal("rate", max(1, math.ceil(wait_s)))
        self._inflight[client] = self._inflight.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        left = self._inflight.get(client, 0) - 1
        if left > 0:
            self._inflight[client] = left
        else:
            self._inflight.pop(client, None)

    def inflight(self, client: str) -> int:
        return self._inflight.get(client, 0)

    def _forget_idle(self, now: float) -> None:
        """Keep at most ``max_clients`` buckets: drop the least recently seen idle ones,
        full ones first (forgetting a full bucket changes nothing)."""
        excess = len(self._buckets) - self.limits.max_clients
        if excess <= 0:
            return
        for key in [k for k, b in self._buckets.items() if b.is_full(now)][:excess]:
            if key not in self._inflight:
                del self._buckets[key]
                excess -= 1
        for key in list(self._buckets):
            if excess <= 0:
                break
            if key not in self._inflight:
                del self._buckets[key]
                excess -= 1


def client_key(authorization: str | None, peer: str | None) -> tuple[str, str]:
    """(key, how to name the client in a message). The token itself never appears in either."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        digest = hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).hexdigest()
        return "token:" + digest, f"the client with bearer token sha256:{digest[:12]}…"
    address = peer or "unknown"
    return "peer:" + address, f"the client at {address}"
