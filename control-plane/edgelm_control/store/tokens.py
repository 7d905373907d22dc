"""Operator tokens, hashed: sha256 hex of the token, never the token itself.

``tokens.json`` (written by ``edgelm provision fleet-init``) is the source; at start the file's
entries replace the rows that came from the file, so every replica sharing the store checks
the same tokens, and a token removed from the file stops working.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from edgelm_control.store.schema import operator_tokens

FILE_SOURCE = "file"


@dataclass(frozen=True)
class TokenEntry:
    name: str
    sha256: str
    created_at_s: int


async def replace_file_tokens(conn: AsyncConnection, entries: Sequence[TokenEntry]) -> None:
    await conn.execute(delete(operator_tokens).where(operator_tokens.c.source == FILE_SOURCE))
    if entries:
        await conn.execute(
            operator_tokens.insert(),
            [
                {
                    "name": e.name,
                    "sha256": e.sha256,
                    "created_at_s": e.created_at_s,
                    "source": FILE_SOURCE,
                }
                for e in entries
            ],
        )


async def token_hashes(conn: AsyncConnection) -> list[str]:
    return [row[0] for row in await conn.execute(select(operator_tokens.c.sha256))]
