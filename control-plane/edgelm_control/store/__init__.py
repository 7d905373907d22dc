"""The control plane's store: SQLAlchemy 2 Core on SQLite or PostgreSQL (asyncio drivers).

- :mod:`.schema`: the tables; :mod:`.migrate` and ``migrations/``: Alembic, run at start;
- :mod:`.database`: :class:`Store`, the engine with its read and write transactions;
- one module of queries per area, each taking an open connection so that one transaction can
  span several: :mod:`.devices`, :mod:`.desired`, :mod:`.models`, :mod:`.rollouts`,
  :mod:`.events`, :mod:`.telemetry`, :mod:`.jobs`, :mod:`.tokens`.
"""

from edgelm_control.store.database import Store, async_url, redacted

__all__ = ["Store", "async_url", "redacted"]
