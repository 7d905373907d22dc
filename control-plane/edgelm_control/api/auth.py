"""Operator authentication: bearer tokens checked against sha256 hashes, in constant time.

The control plane never stores a token, only ``sha256(token)`` in hex (``tokens.json``, made
by ``edgelm provision fleet-init``, and its copy in the store). A presented token is hashed
and compared with every known hash using :func:`hmac.compare_digest`, all of them every
time, so neither a match's position nor a near miss shows in the timing.

The known hashes come from the store (where the file's entries are loaded at start, so all
replicas agree) and are cached for a few seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from edgelm_control.errors import ConfigError, NotAuthorized
from edgelm_control.store import Store
from edgelm_control.store.tokens import TokenEntry, token_hashes

_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CACHE_S = 5.0


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_tokens_file(path: Path) -> list[TokenEntry]:
    """Parse ``{"tokens": [{"name", "sha256", "created_at"}]}``; a precise error if not."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"the tokens file {path} does not exist; edgelm provision fleet-init writes it"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the tokens file {path}: {exc.strerror}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the tokens file {path} is not JSON: {exc}") from exc
    items = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f'the tokens file {path} must hold {{"tokens": [...]}}')
    entries = []
    for index, item in enumerate(items):
        where = f"{path}: tokens[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be an object")
        name, digest = item.get("name"), item.get("sha256")
        created = item.get("created_at", 0)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}.name must be 1-64 of A-Z a-z 0-9 . _ -, got {name!r}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ConfigError(f"{where}.sha256 must be 64 lower-case hex characters")
        if isinstance(created, bool) or not isinstance(created, int) or created < 0:
            raise ConfigError(f"{where}.created_at must be Unix seconds")
        entries.append(TokenEntry(name, digest, created))
    return entries


class TokenChecker:
    def __init__(self, store: Store, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self._hashes: tuple[bytes, ...] = ()
        self._loaded_at = float("-inf")

    async def _known(self) -> tuple[bytes, ...]:
        if self._clock() - self._loaded_at >= CACHE_S:
            async with self._store.read() as conn:
                self._hashes = tuple(h.encode() for h in await token_hashes(conn))
            self._loaded_at = self._clock()
        return self._hashes

    async def check(self, authorization: str | None) -> None:
        """Return if ``authorization`` carries a known bearer token; else :class:`NotAuthorized`."""
        if not authorization:
            raise NotAuthorized(
                "this call needs an operator token: Authorization: Bearer TOKEN",
                param="authorization",
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthorized(
                "the Authorization header must be 'Bearer TOKEN'", param="authorization"
            )
        presented = token_hash(token.strip()).encode()
        matched = False
        for known in await self._known():
            matched |= hmac.compare_digest(presented, known)
        if not matched:
            raise NotAuthorized("the token is not a known operator token", param="authorization")
