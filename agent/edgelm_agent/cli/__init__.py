"""Device-side commands: ``edgelm agent``, ``edgelm chat``."""
