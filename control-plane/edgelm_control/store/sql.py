"""What every query module needs: the dialect's INSERT (for upserts) and JSON as text.

``INSERT ... ON CONFLICT`` is spelled the same in SQLite (3.24+) and PostgreSQL, but
SQLAlchemy builds it from each dialect's own ``insert``; :func:`insert_for` picks the right
one for a connection, so the query modules are written once for both databases.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

JSONText = str


def insert_for(conn: AsyncConnection, table: Table) -> Any:
    """The dialect-specific INSERT for ``table``, which has ``on_conflict_do_*``."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def dumps(value: object) -> JSONText:
    """JSON text for a column. ASCII only: a lone surrogate or ``\\u0000`` in a string
    becomes an escape, which both databases store as it is in a text column."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"), sort_keys=True)


def loads(text: JSONText | None) -> Any:
    return None if text is None else json.loads(text)


def loads_object(text: JSONText | None) -> dict[str, Any]:
    value = loads(text)
    return value if isinstance(value, dict) else {}


def labels_of(text: JSONText | None) -> Mapping[str, str]:
    value = loads_object(text)
    return {str(k): str(v) for k, v in value.items()}


def chunks(items: list[Any], size: int = 500) -> list[list[Any]]:
    """Split ``IN (...)`` lists: SQLite allows at most 32766 bound parameters per statement."""
    return [items[i : i + size] for i in range(0, len(items), size)]
