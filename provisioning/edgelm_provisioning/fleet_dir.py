"""The fleet directory: where each file lives, and ``fleet.toml``, the fleet's own settings.

Layout (documented for operators in docs/fleet.md; what leaves the operator's machine is said
in :mod:`edgelm_provisioning.fleet_init`)::

    DIR/
      fleet.toml              fleet, control_url, broker_url
      root.json               the fleet's TUF root (copy of control/repository/metadata/1.root.json)
      keys/                   OFFLINE (0700): root-0.pem, targets-0.pem (0600)
      operator-token          the operator's bearer token, plaintext (0600)
      devices/ID.json         inventory: no secrets
      trusted-metadata/       the repository metadata this machine last verified (python-tuf's
                              client cache): what makes a rollback by the server detectable
      control/                copied to the control-plane server as it is
        control.toml  tokens.json  repository/  keys/ (0700: snapshot-0, timestamp-0, director)
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from edgelm_protocol.errors import InvalidId
from edgelm_protocol.ids import check_fleet_id
from edgelm_protocol.mqtt import InvalidBrokerUrl, parse_broker_url
from edgelm_provisioning.errors import FleetDirError, InvalidValue
from edgelm_provisioning.toml_file import dump_toml, load_toml

DEFAULT_CONTROL_URL = "http://127.0.0.1:8480"
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
#: Where the control plane listens when a reverse proxy answers its public URL.
PROXIED_LISTEN = "127.0.0.1:8480"


@dataclass(frozen=True)
class FleetPaths:
    """Every path of one fleet directory; nothing here touches the disk."""

    root: Path

    @property
    def fleet_toml(self) -> Path:
        return self.root / "fleet.toml"

    @property
    def root_json(self) -> Path:
        return self.root / "root.json"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def targets_key(self) -> Path:
        return self.keys_dir / "targets-0.pem"

    @property
    def operator_token(self) -> Path:
        return self.root / "operator-token"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    @property
    def trusted_metadata_dir(self) -> Path:
        return self.root / "trusted-metadata"

    @property
    def control_dir(self) -> Path:
        return self.root / "control"

    @property
    def control_toml(self) -> Path:
        return self.control_dir / "control.toml"

    @property
    def tokens_json(self) -> Path:
        return self.control_dir / "tokens.json"

    @property
    def repository_dir(self) -> Path:
        return self.control_dir / "repository"

    @property
    def control_keys_dir(self) -> Path:
        return self.control_dir / "keys"

    @property
    def director_key(self) -> Path:
        return self.control_keys_dir / "director.pem"

    def device_record(self, device_id: str) -> Path:
        return self.devices_dir / f"{device_id}.json"

    def holds_fleet(self) -> bool:
        """Whether anything of a fleet is here already (so nothing may be generated over it)."""
        return any(
            p.exists() or p.is_symlink()
            for p in (self.fleet_toml, self.keys_dir, self.control_dir, self.operator_token)
        )


def check_control_url(url: str, param: str = "control_url") -> str:
    """An ``http(s)://host[:port][/prefix]`` URL, without credentials, query or fragment.

    Returned without a trailing ``/`` so that ``url + "/api/v1/..."`` is always right.
    """
    parts = _split_url(url, param, ("http", "https"))
    if parts.query or parts.fragment:
        raise InvalidValue(param, f"{param} must not have a query or fragment, got {url!r}")
    return url.rstrip("/")


def check_broker_url(url: str, param: str = "broker_url") -> str:
    """An ``mqtt://host[:port]`` or ``mqtts://host[:port]`` URL, without credentials or path;
    ``?protocol=3.1.1`` makes devices and the control plane speak MQTT 3.1.1 (demo brokers).

    Credentials are per device (each bundle carries its own), never part of the fleet's URL.
    The rest is the protocol package's parser, the one the agent and control plane use.
    """
    _split_url(url, param, ("mqtt", "mqtts"))
    try:
        parse_broker_url(url)
    except InvalidBrokerUrl as exc:
        raise InvalidValue(param, f"{param}: {exc}") from exc
    return url.rstrip("/")


def _split_url(url: str, param: str, schemes: tuple[str, ...]) -> urllib.parse.SplitResult:
    expected = " or ".join(f"{s}://HOST[:PORT]" for s in schemes)
    if not isinstance(url, str) or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise InvalidValue(param, f"{param} must be {expected} without spaces, got {url!r}")
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port  # raises for a port that is not a number or out of range
    except ValueError as exc:
        raise InvalidValue(param, f"{param} has a bad port: {url!r}") from exc
    if parts.scheme not in schemes or not parts.hostname:
        raise InvalidValue(param, f"{param} must be {expected}, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise InvalidValue(
            param,
            f"{param} must not hold credentials, got {url!r}",
            hint="each device gets its own broker credentials in its enrollment bundle",
        )
    del port
    return parts


def listen_address(control_url: str) -> str:
    """Where the control plane listens (``http`` in control.toml) for its public URL.

    * ``http://`` or ``https://`` with an explicit port: that port, on the URL's host when it
      is a loopback address (a one-machine setup), else on every interface (devices connect
      directly; for ``https://`` the control plane serves TLS itself, see
      :func:`serves_tls`);
    * no explicit port: :data:`PROXIED_LISTEN`, behind a reverse proxy that answers the
      public URL (and for ``https://`` terminates TLS, with the certificate fleet-init made).
    """
    parts = urllib.parse.urlsplit(control_url)
    if parts.port is None or parts.hostname is None:
        return PROXIED_LISTEN
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if not loopback:
        return f"0.0.0.0:{parts.port}"
    return f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"


def serves_tls(control_url: str) -> bool:
    """Whether the control plane serves HTTPS itself: an ``https://`` URL with a port."""
    parts = urllib.parse.urlsplit(control_url)
    return parts.scheme == "https" and parts.port is not None


@dataclass(frozen=True)
class FleetConfig:
    """``fleet.toml``: the fleet's name and where its control plane and broker are."""

    fleet: str
    control_url: str
    broker_url: str

    def __post_init__(self) -> None:
        try:
            check_fleet_id(self.fleet)
        except InvalidId as exc:
            raise InvalidValue("fleet", str(exc)) from exc
        object.__setattr__(self, "control_url", check_control_url(self.control_url))
        object.__setattr__(self, "broker_url", check_broker_url(self.broker_url))

    @property
    def repository_url(self) -> str:
        return f"{self.control_url}/repository"

    def to_toml(self) -> str:
        return dump_toml(
            {"fleet": self.fleet, "control_url": self.control_url, "broker_url": self.broker_url},
            comments={
                "fleet": "the fleet's id (MQTT topics: edgelm/v1/<fleet>/...)",
                "control_url": "where devices and `edgelm fleet` reach the control plane",
                "broker_url": "the MQTT broker devices connect to",
            },
        )

    @classmethod
    def load(cls, path: Path) -> FleetConfig:
        data = load_toml(path)
        missing = [k for k in ("fleet", "control_url", "broker_url") if k not in data]
        if missing:
            raise InvalidValue(str(path), f"{path} lacks {', '.join(missing)}")
        values = {k: data[k] for k in ("fleet", "control_url", "broker_url")}
        if not all(isinstance(v, str) for v in values.values()):
            raise InvalidValue(str(path), f"{path}: fleet, control_url and broker_url are strings")
        return cls(**values)


@dataclass(frozen=True)
class FleetDir:
    """An existing fleet directory: its paths and its ``fleet.toml``."""

    paths: FleetPaths
    config: FleetConfig

    @classmethod
    def open(cls, root: Path) -> FleetDir:
        paths = FleetPaths(root)
        if not paths.fleet_toml.is_file():
            raise FleetDirError(
                "not-a-fleet-dir",
                root,
                f"{root} is not a fleet directory: it has no fleet.toml",
                hint="create one with `edgelm provision fleet-init DIR`, or check --fleet-dir",
            )
        return cls(paths, FleetConfig.load(paths.fleet_toml))

    def require(self, path: Path, what: str) -> Path:
        """``path`` if it exists, else a :class:`FleetDirError` saying which part is missing."""
        if not path.exists():
            raise FleetDirError(
                "fleet-dir-incomplete",
                self.paths.root,
                f"the fleet directory lacks {what} ({path})",
                hint="this file is made by `edgelm provision fleet-init`; restore it from "
                "your backup of the fleet directory",
            )
        return path
