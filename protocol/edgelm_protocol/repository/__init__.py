"""A TUF repository in a folder, and the atomic file writes it needs (this does I/O).

The rest of :mod:`edgelm_protocol` is sans-IO. This subpackage is the one piece of file I/O that
three programs share: a standalone agent keeps its own repository, provisioning creates a
fleet's, and the control plane publishes models into it. Keeping one writer means the three
produce exactly the metadata the agent's python-tuf client verifies.
"""

from edgelm_protocol.repository.atomic_file import fsync_dir, write_atomic
from edgelm_protocol.repository.writer import (
    DEFAULT_EXPIRY,
    ROLES,
    RepositoryWriter,
    generate_key,
    listed_signers,
    load_key,
    load_role_keys,
)

__all__ = [
    "DEFAULT_EXPIRY",
    "ROLES",
    "RepositoryWriter",
    "fsync_dir",
    "generate_key",
    "listed_signers",
    "load_key",
    "load_role_keys",
    "write_atomic",
]
