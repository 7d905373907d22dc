"""The local API: one aiohttp application served on the Unix socket and on loopback HTTP."""
