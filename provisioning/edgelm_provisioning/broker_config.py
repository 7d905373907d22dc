"""``edgelm provision broker-config``: a Mosquitto configuration (and EMQX ACL rules) for a fleet.

The ACL is made from :data:`edgelm_protocol.topics.CHANNELS`, the one table of who publishes on
which channel, so it cannot drift from what the agent and control plane do:

* a device (its broker user name is its certificate's CN, ``use_identity_as_username``) may
  publish only its own ``edgelm/v1/{fleet}/dev/{id}/`` device-to-control channels (presence,
  state, telemetry, events), read only its own control-to-device channels (desired, jobs,
  ack), and read the fleet's ``announce``; nothing else, not even another fleet's topics;
* the control plane (CN ``control``, and each replica's ``control:NAME`` from
  :mod:`edgelm_provisioning.control_identity`; never a device id) may read and write
  everything under ``edgelm/v1/{fleet}/``, shared subscriptions (``$share/GROUP/...``) included.

During a CA rotation (:mod:`edgelm_provisioning.ca_rotation`) ``ca.pem`` is the bundle of both
CAs, ``crl.pem`` holds both CRLs and ``server.pem`` carries the cross-certificate; run
broker-config again (``--force``) after each step of a rotation and after issuing or revoking a
replica's identity, and restart the broker.

Files written to ``--out``: ``mosquitto.conf``, ``acl``, ``ca.pem``, ``server.pem``,
``server-key.pem`` (0600), ``crl.pem``, ``emqx-acl.conf`` and the persistence folder ``data/``.
The paths inside ``mosquitto.conf`` are those of ``--install-dir`` (where the folder will be on
the broker host; default: ``--out`` itself).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from edgelm_protocol.mqtt import parse_broker_url
from edgelm_protocol.repository.atomic_file import write_atomic
from edgelm_protocol.topics import CHANNELS, TOPIC_ROOT, Direction
from edgelm_provisioning.control_identity import control_identities
from edgelm_provisioning.errors import AlreadyIssued, InvalidValue
from edgelm_provisioning.fleet_ca import CONTROL_CN, FleetCa
from edgelm_provisioning.fleet_dir import FleetDir

DEFAULT_TLS_PORT = 8883
FILES = (
    "mosquitto.conf",
    "acl",
    "ca.pem",
    "server.pem",
    "server-key.pem",
    "crl.pem",
    "emqx-acl.conf",
)


@dataclass(frozen=True)
class BrokerConfig:
    out: Path
    port: int
    files: tuple[str, ...]
    control_identities: tuple[str, ...] = (CONTROL_CN,)
    ca_rotation: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "out": str(self.out),
            "port": self.port,
            "files": list(self.files),
            "control_identities": list(self.control_identities),
            "ca_rotation": self.ca_rotation,
        }


def device_rights(fleet: str) -> tuple[list[str], list[str]]:
    """(publish, subscribe) topic templates of a device, with ``{id}`` for its id."""
    base = f"{TOPIC_ROOT}/{fleet}"
    publish, subscribe = [], []
    for channel, spec in CHANNELS.items():
        if spec.direction is Direction.DEVICE_TO_CONTROL:
            publish.append(f"{base}/dev/{{id}}/{channel}")
        elif spec.direction is Direction.CONTROL_TO_DEVICE:
            subscribe.append(f"{base}/dev/{{id}}/{channel}")
        else:
            subscribe.append(f"{base}/{channel}")
    return publish, subscribe


def mosquitto_acl(fleet: str, control: tuple[str, ...] = (CONTROL_CN,)) -> str:
    """The ACL file; ``control`` lists the control plane's identities (CNs)."""
    publish, subscribe = device_rights(fleet)
    lines = [
        f"# edgelm fleet {fleet}: written by `edgelm provision broker-config`.",
        "# User names are certificate CNs (use_identity_as_username): a device's is its id.",
        "# Anything not granted here is denied.",
        "",
        "# The control plane (each replica its own identity): every topic of the fleet.",
    ]
    for cn in control:
        lines += [f"user {cn}", f"topic readwrite {TOPIC_ROOT}/{fleet}/#"]
    lines += [
        "",
        "# Every device (%u = its id): publish its own up channels, read its own down",
        "# channels and the fleet's announce.",
    ]
    lines += [f"pattern write {t.format(id='%u')}" for t in publish]
    lines += [f"pattern read {t.format(id='%u')}" for t in subscribe]
    return "\n".join(lines) + "\n"


def emqx_acl(fleet: str, control: tuple[str, ...] = (CONTROL_CN,)) -> str:
    """EMQX 5 file authorization rules (``acl.conf``), with ``${username}`` placeholders;
    ``control`` lists the control plane's identities (CNs)."""
    publish, subscribe = device_rights(fleet)
    control_rules = "".join(
        f'{{allow, {{username, "{cn}"}}, all, ["{TOPIC_ROOT}/{fleet}/#"]}}.\n' for cn in control
    )

    def topics(items: list[str]) -> str:
        return ", ".join(f'"{t.format(id="${username}")}"' for t in items)

    return (
        f"%% edgelm fleet {fleet}: EMQX 5 file authorization (authorization.sources file).\n"
        "%% Needs mutual TLS on the listener (ssl_options.verify = verify_peer,\n"
        "%% fail_if_no_peer_cert = true) and the certificate's CN as user name\n"
        "%% (mqtt.peer_cert_as_username = cn; for ${clientid} rules also peer_cert_as_clientid).\n"
        "%% Set authorization.no_match = deny.\n"
        f"{control_rules}"
        f"{{allow, all, publish, [{topics(publish)}]}}.\n"
        f"{{allow, all, subscribe, [{topics(subscribe)}]}}.\n"
        '{deny, all, subscribe, ["$SYS/#", {eq, "#"}, {eq, "+/#"}]}.\n'
        "{deny, all}.\n"
    )


def mosquitto_conf(
    fleet: str, *, install_dir: Path, port: int, bind: str | None, run_as_root: bool = False
) -> str:
    d = install_dir
    listener = f"listener {port} {bind}" if bind else f"listener {port}"
    lines = [
        f"# edgelm fleet {fleet}: written by `edgelm provision broker-config`.",
        "# Reload the CRL (after `edgelm provision revoke`) with: kill -HUP <mosquitto pid>",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {d / 'acl'}",
        "persistence true",
        f"persistence_location {d / 'data'}/",
        "log_dest stderr",
        "connection_messages true",
        *([] if not run_as_root else ["user root"]),
        "",
        "# The only listener: TLS with client certificates from the fleet CA.",
        listener,
        f"cafile {d / 'ca.pem'}",
        f"certfile {d / 'server.pem'}",
        f"keyfile {d / 'server-key.pem'}",
        f"crlfile {d / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "# The client id is the user name: a device cannot take over another's session.",
        "use_username_as_clientid true",
    ]
    return "\n".join(lines) + "\n"


def write_broker_config(
    fleet_dir: FleetDir,
    out: Path,
    *,
    port: int | None,
    bind: str | None,
    install_dir: Path | None,
    now: int,
    force: bool = False,
    run_as_root: bool = False,
) -> BrokerConfig:
    ca = FleetCa.load(fleet_dir.paths.root)
    fleet = fleet_dir.config.fleet
    if port is None:
        broker = parse_broker_url(fleet_dir.config.broker_url)
        port = broker.port if broker.tls else DEFAULT_TLS_PORT
    if not 0 < port <= 65535:
        raise InvalidValue("port", f"port must be 1-65535, got {port}")
    if bind is not None and (not bind or any(c.isspace() for c in bind)):
        raise InvalidValue("bind", f"bind must be an address, got {bind!r}")
    taken = [name for name in FILES if (out / name).exists()]
    if taken and not force:
        raise AlreadyIssued(
            "broker-config",
            str(out),
            f"{out} holds a broker configuration already ({', '.join(taken)})",
            hint="--force rewrites it (the persistence folder data/ is kept)",
        )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    (out / "data").mkdir(mode=0o700, exist_ok=True)
    target = (install_dir or out).absolute()
    paths = ca.paths
    write_atomic(
        out / "mosquitto.conf",
        mosquitto_conf(
            fleet, install_dir=target, port=port, bind=bind, run_as_root=run_as_root
        ).encode(),
        mode=0o644,
    )
    control = tuple(control_identities(ca, now=now))
    write_atomic(out / "acl", mosquitto_acl(fleet, control).encode(), mode=0o644)
    write_atomic(out / "emqx-acl.conf", emqx_acl(fleet, control).encode(), mode=0o644)
    write_atomic(out / "ca.pem", ca.trust_pem.encode(), mode=0o644)
    write_atomic(out / "server.pem", paths.server_cert.read_bytes(), mode=0o644)
    write_atomic(out / "server-key.pem", paths.server_key.read_bytes(), mode=0o600)
    write_atomic(out / "crl.pem", ca.crl_pem(now=now), mode=0o644)
    return BrokerConfig(out, port, FILES, control, ca.rotating)


def copy_crl(crl: Path, broker_dir: Path) -> Path:
    """Put the fleet's CRL where a broker configuration made by broker-config reads it."""
    if not (broker_dir / "mosquitto.conf").is_file():
        raise InvalidValue(
            "broker_dir",
            f"{broker_dir} is not a folder written by `edgelm provision broker-config`",
        )
    target = broker_dir / "crl.pem"
    tmp = broker_dir / ".crl.pem.tmp"
    shutil.copyfile(crl, tmp)
    tmp.chmod(0o644)
    tmp.replace(target)
    return target
