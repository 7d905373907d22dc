"""edgelm agent: the on-device daemon (registry, inference, jobs, sync, local API)."""

__version__ = "0.1.0"
