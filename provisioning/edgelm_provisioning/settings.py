"""Where ``edgelm fleet`` finds its control plane and token: the one place that reads the
environment.

Each setting comes from the first of these that is set:

=================  ==========================  ==========================================
setting            flag                        then
=================  ==========================  ==========================================
control-plane URL  ``--control URL``           ``$EDGELM_CONTROL_URL``, then
                                               ``control_url`` in ``--fleet-dir``'s fleet.toml
bearer token       ``--token TOKEN``           ``$EDGELM_CONTROL_TOKEN``, then
                                               ``--fleet-dir``'s ``operator-token`` file
=================  ==========================  ==========================================

A flag typed for this one command wins over the environment, which wins over the files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgelm_provisioning.errors import MissingSetting
from edgelm_provisioning.fleet_dir import FleetDir, check_control_url

ENV_CONTROL_URL = "EDGELM_CONTROL_URL"
ENV_CONTROL_TOKEN = "EDGELM_CONTROL_TOKEN"  # noqa: S105  # a variable name, not a secret


@dataclass(frozen=True)
class OperatorSettings:
    control_url: str
    token: str
    fleet: FleetDir | None
    #: Where each came from, for error messages ("--control", "$EDGELM_CONTROL_URL", a path).
    control_from: str
    token_from: str


def resolve_settings(
    *,
    control: str | None,
    token: str | None,
    fleet_dir: Path | None,
    env: Mapping[str, str] | None = None,
) -> OperatorSettings:
    """The control URL and token for one command, from flags, environment and fleet dir."""
    env = os.environ if env is None else env
    fleet = FleetDir.open(fleet_dir) if fleet_dir is not None else None
    if control:
        control_url, control_from = control, "--control"
    elif env.get(ENV_CONTROL_URL):
        control_url, control_from = env[ENV_CONTROL_URL], f"${ENV_CONTROL_URL}"
    elif fleet is not None:
        control_url, control_from = fleet.config.control_url, str(fleet.paths.fleet_toml)
    else:
        raise MissingSetting(
            "control_url",
            "no control plane given",
            hint=f"pass --control URL, set {ENV_CONTROL_URL}, or pass --fleet-dir DIR",
        )
    control_url = check_control_url(control_url, control_from)
    if token:
        secret, token_from = token, "--token"
    elif env.get(ENV_CONTROL_TOKEN):
        secret, token_from = env[ENV_CONTROL_TOKEN], f"${ENV_CONTROL_TOKEN}"
    elif fleet is not None and fleet.paths.operator_token.exists():
        token_file = fleet.paths.operator_token
        secret, token_from = token_file.read_text(encoding="utf-8").strip(), str(token_file)
    else:
        raise MissingSetting(
            "token",
            "no operator token given",
            hint=f"pass --token TOKEN, set {ENV_CONTROL_TOKEN}, or pass --fleet-dir DIR "
            "(its operator-token file)",
        )
    if not secret or any(ord(c) < 33 or ord(c) > 126 for c in secret):
        raise MissingSetting(
            "token",
            f"the token from {token_from} is empty or holds characters a token cannot hold",
            hint="tokens are printable ASCII without spaces (edgelm provision token create)",
        )
    return OperatorSettings(control_url, secret, fleet, control_from, token_from)
