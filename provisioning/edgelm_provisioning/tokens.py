"""Operator tokens: made here, shown once, stored only as sha256 hashes in ``tokens.json``.

``control/tokens.json`` is what the control plane checks bearer tokens against::

    {"tokens": [{"name": "operator", "sha256": "<hex of sha256(token)>", "created_at": 1795344276}]}

A token is 32 random bytes, URL-safe base64 (``secrets.token_urlsafe(32)``): with that much
entropy a plain sha256 is enough (no salt, no slow hash), because nobody can guess a token to
match a stolen hash. The plaintext of the token named ``operator`` is kept in
``DIR/operator-token`` (0600) so the operator's own ``edgelm fleet`` commands find it; any
other token is printed once and never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm_protocol.ids import ID_PATTERN
from edgelm_protocol.repository.atomic_file import write_atomic
from edgelm_provisioning.errors import AlreadyIssued, InvalidValue, NotIssued

TOKEN_BYTES = 32
OPERATOR = "operator"
_MAX_TOKENS = 1000


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_token_name(name: str) -> str:
    if not isinstance(name, str) or not ID_PATTERN.fullmatch(name):
        raise InvalidValue(
            "name",
            f"a token name must be 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit, "
            f"got {name!r}",
        )
    return name


@dataclass(frozen=True)
class TokenEntry:
    name: str
    sha256: str
    created_at: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "created_at": self.created_at}

    def matches(self, token: str) -> bool:
        return hmac.compare_digest(self.sha256, token_sha256(token))


@dataclass(frozen=True)
class IssuedToken:
    """A token just made: the only moment its plaintext exists outside the operator's file."""

    entry: TokenEntry
    token: str


class TokenFile:
    """``tokens.json``, read and rewritten whole (atomically, 0600) on each change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[TokenEntry]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_bytes())
            items = data["tokens"]
            entries = [
                TokenEntry(str(t["name"]), str(t["sha256"]), int(t["created_at"])) for t in items
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidValue(str(self.path), f"{self.path} is not a tokens file: {exc}") from exc
        return entries

    def _save(self, entries: list[TokenEntry]) -> None:
        body = {"tokens": [e.as_dict() for e in entries]}
        write_atomic(self.path, (json.dumps(body, indent=2) + "\n").encode(), mode=0o600)

    def create(self, name: str, *, now: int) -> IssuedToken:
        """A new random token named ``name``; refused if the name is taken."""
        check_token_name(name)
        entries = self.entries()
        if any(e.name == name for e in entries):
            raise AlreadyIssued(
                "token",
                name,
                f"a token named {name!r} exists already",
                hint=f"revoke it first (edgelm provision token revoke {name}) or pick a new name",
            )
        if len(entries) >= _MAX_TOKENS:
            raise InvalidValue("name", f"at most {_MAX_TOKENS} tokens; revoke unused ones first")
        token = new_token()
        entry = TokenEntry(name, token_sha256(token), now)
        self._save([*entries, entry])
        return IssuedToken(entry, token)

    def revoke(self, name: str) -> TokenEntry:
        check_token_name(name)
        entries = self.entries()
        gone = [e for e in entries if e.name == name]
        if not gone:
            known = ", ".join(e.name for e in entries) or "none"
            raise NotIssued("token", name, f"no token named {name!r} (tokens: {known})")
        self._save([e for e in entries if e.name != name])
        return gone[0]
