"""Durable jobs and the outbox: SQLite in WAL mode, so work outlives crashes and months offline."""
