"""The REST API under ``/api/v1``, health, metrics and the repository over HTTP (aiohttp)."""
