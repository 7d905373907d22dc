"""The one way to build the device's registry from the agent's configuration.

The daemon and the ``edgelm models`` commands on a stopped agent both build it here, so
``--state-dir`` mode sees exactly the repository, mirrors and trust root the agent would.
"""

from __future__ import annotations

from edgelm_agent.config import AgentConfig
from edgelm_agent.crash_points import crash_point_from
from edgelm_agent.registry.registry import Registry, RegistryConfig


def registry_for(config: AgentConfig) -> Registry:
    return Registry(
        RegistryConfig(
            root=config.state_dir / "registry",
            mirrors=config.repository_mirrors,
            trust_root=config.repository_root,
            free_margin_bytes=config.disk_margin_bytes,
        ),
        crash_point=crash_point_from(config.crash_point),
    )
