"""Control-plane configuration: defaults < control.toml < ``EDGELM_CONTROL_*`` < flags.

This is the only module of the control plane that reads ``os.environ``. Everything else
receives a frozen :class:`ControlConfig`. Each setting is declared once in :data:`SETTINGS`
with its TOML key, its environment variable and its parser, so the three sources cannot
drift apart; the defaults live on the dataclass, documented next to each field.

Paths: a relative path written in control.toml is relative to the folder holding the file
(``edgelm provision fleet-init`` writes ``repository_dir = "repository"`` and copies the
folder to the server as it is); one given in the environment or as a flag is relative to the
working directory, as a shell user expects. ``data_dir`` defaults to the config file's folder
(or ``/var/lib/edgelm-control`` without one), and the database, repository, keys and tokens
default to places inside it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from edgelm_control.errors import ConfigError
from edgelm_protocol import InvalidId, check_fleet_id
from edgelm_protocol.ids import check_share_group
from edgelm_protocol.mqtt.broker_url import BrokerUrl
from edgelm_protocol.mqtt.broker_url import parse_broker_url as _parse_broker_url
from edgelm_protocol.mqtt.settings import require_tls_unless_loopback

LogFormat = Literal["auto", "json", "console"]

DEFAULT_DATA_DIR = Path("/var/lib/edgelm-control")
DEFAULT_HTTP_PORT = 8480
DAY_S = 24 * 3600
ENV_PREFIX = "EDGELM_CONTROL_"
_REPLICA_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


@dataclass(frozen=True)
class HttpListen:
    """Where the HTTP server binds (``HOST:PORT``; port 0 picks a free one, for tests)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


BrokerAddress = BrokerUrl
"""The MQTT broker, from ``mqtt://[user[:password]@]host[:port][?protocol=5|3.1.1]``
(``mqtts://`` for TLS): the protocol package's parsed broker URL, shared with the agent."""


@dataclass(frozen=True)
class ControlConfig:
    """Everything the control plane needs to start. Units are in the names."""

    #: The fleet's id; every topic is under ``edgelm/v1/{fleet}/``. Required.
    fleet: str = ""
    #: This replica's name: the broker client id is ``control-{fleet}-{replica}``.
    replica: str = "0"
    #: Where the HTTP server (REST API, repository, health, metrics) listens.
    http: HttpListen = field(default_factory=lambda: HttpListen("127.0.0.1", DEFAULT_HTTP_PORT))
    #: The server certificate (PEM, with its chain) and key for HTTPS on ``http``: the
    #: certificate ``edgelm provision fleet-init`` issued (control/tls/server.pem), which
    #: devices verify against the fleet CA. ``None``: plain HTTP (loopback, or behind a proxy).
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    #: How devices and operators reach this server; ``None``: ``http://{http}`` (``https://``
    #: with ``http_tls_cert``).
    public_url: str | None = None
    #: Folder for the SQLite database and the default places of the files below.
    data_dir: Path = DEFAULT_DATA_DIR
    #: SQLAlchemy URL of the store: ``sqlite:///PATH`` (default ``{data_dir}/control.db``) or
    #: ``postgresql://user@host/db``. Stored with an absolute SQLite path.
    db: str = ""
    #: The MQTT broker. ``?protocol=3.1.1`` speaks MQTT 3.1.1 (demo brokers only; no
    #: ``shared_group``, and the broker's own settings replace ``mqtt_session_expiry_s`` and
    #: ``mqtt_receive_maximum``).
    broker: BrokerAddress = field(default_factory=lambda: BrokerAddress("127.0.0.1"))
    #: The fleet CA (PEM) the broker's certificate must chain to, for ``mqtts://``. ``None``:
    #: the system's trust store. Set, it also forbids plain ``mqtt://`` to a non-loopback host.
    broker_ca: Path | None = None
    #: The control plane's client certificate and key (PEM) for mutual TLS: the identity
    #: ``control`` that ``edgelm provision fleet-init`` issues (control/tls/).
    broker_cert: Path | None = None
    broker_key: Path | None = None
    #: The fleet's TUF repository (``metadata/``, ``targets/``); default ``{data_dir}/repository``.
    repository_dir: Path = Path()
    #: Online keys: ``snapshot-N.pem``, ``timestamp-N.pem``, ``director.pem``.
    keys_dir: Path = Path()
    #: Operator tokens, stored as sha256 hashes (``{"tokens": [{"name", "sha256", ...}]}``).
    tokens_file: Path = Path()
    #: ``None``: plain subscriptions. A name: MQTT shared subscriptions ``$share/{name}/...``,
    #: so several replicas split the devices' traffic.
    shared_group: str | None = None
    #: How long a signed desired state is valid. Devices refuse an expired one, so the
    #: director re-signs current assignments before they expire.
    desired_expiry_s: int = 7 * DAY_S
    #: A current assignment is re-signed when less than this is left of its validity.
    desired_resign_before_s: int = 2 * DAY_S
    #: Default of a rollout's ``device_timeout_s``: a notified, online device silent this
    #: long is ``timed_out``.
    device_timeout_s: int = 1800
    #: Default of a rollout's ``pending_expiry_s``: an offline device still ``pending`` this
    #: long after its wave started is ``expired``.
    pending_expiry_s: int = 7 * DAY_S
    #: Telemetry older than this is deleted.
    telemetry_retention_s: int = 30 * DAY_S
    #: Device events older than this are deleted (they feed the health gate's baselines).
    event_retention_s: int = 180 * DAY_S
    #: Inbound messages stored in one transaction, at most.
    ingest_batch_max: int = 500
    #: How long the first message of a batch waits for others before the batch is stored.
    ingest_flush_interval_s: float = 0.05
    #: Processes that decode telemetry beside the event loop (0: decode in the loop). One
    #: frees the loop for MQTT and the store; more help only with several free cores.
    ingest_decode_workers: int = 1
    #: QoS 1 messages the broker may send before we acknowledge one (backpressure: messages
    #: are acknowledged once stored, so this bounds what waits in memory).
    mqtt_receive_maximum: int = 2000
    #: How long the broker keeps this replica's session (and queued messages) while it is away.
    mqtt_session_expiry_s: int = 7 * DAY_S
    #: How often the rollout engine looks at clocks and gates when nothing wakes it sooner.
    engine_tick_s: float = 2.0
    #: How often maintenance runs: re-signing desired states and TUF timestamps, pruning.
    maintenance_interval_s: float = 600.0
    #: The TUF snapshot and timestamp are re-signed when less than this is left of them.
    timestamp_refresh_before_s: int = 2 * DAY_S
    #: Largest JSON request body, in bytes.
    max_body_bytes: int = 1 << 20
    #: Largest model upload (all parts of one ``POST /api/v1/models``), in bytes.
    max_upload_bytes: int = 16 << 30
    #: Changes buffered per SSE client; a client that falls this far behind is disconnected.
    sse_queue_max: int = 1000
    #: A comment line keeps idle SSE connections (and proxies) open this often.
    sse_heartbeat_s: float = 15.0
    #: How long a clean stop waits for in-flight work (a batch being stored) before it cancels.
    shutdown_grace_s: float = 10.0
    #: Testing only: the process kills itself with SIGKILL at this named point.
    crash_point: str | None = None
    #: ``auto`` writes JSON lines unless stdout is a terminal.
    log_format: LogFormat = "auto"
    log_level: str = "info"

    @property
    def client_id(self) -> str:
        return f"control-{self.fleet}-{self.replica}"

    @property
    def scheme(self) -> str:
        """``https`` when this server speaks TLS itself, else ``http``."""
        return "https" if self.http_tls_cert is not None else "http"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"{self.scheme}://{self.http}").rstrip("/")


# --- parsers: each takes the raw value from TOML (typed) or env/flags (str) ---------------------


def _integer(value: Any, expected: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected {expected}, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    raise ValueError(f"expected {expected}, got {value!r}")


def _positive_int(value: Any) -> int:
    number = _integer(value, "a positive integer")
    if number <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _non_negative_int(value: Any) -> int:
    number = _integer(value, "an integer >= 0")
    if number < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return number


def _positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number > 0, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number > 0, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"expected a number > 0, got {value!r}")
    return number


def _non_negative_float(value: Any) -> float:
    return 0.0 if value in (0, "0") else _positive_float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value in (None, "") else _text(value)


def _fleet(value: Any) -> str:
    try:
        return check_fleet_id(value)
    except InvalidId as exc:
        raise ValueError(str(exc)) from None


def _replica(value: Any) -> str:
    if not isinstance(value, str) or not _REPLICA_RE.fullmatch(value):
        raise ValueError(f"expected 1-32 of A-Z a-z 0-9 . _ - for a replica name, got {value!r}")
    return value


def _shared_group(value: Any) -> str | None:
    if value in (None, ""):
        return None
    try:
        return check_share_group(value)
    except InvalidId as exc:
        raise ValueError(str(exc)) from None


def _public_url(value: Any) -> str | None:
    if value in (None, ""):
        return None
    parts = urlsplit(_text(value))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return str(value).rstrip("/")


def _log_format(value: Any) -> LogFormat:
    if value not in ("auto", "json", "console"):
        raise ValueError(f"expected auto, json or console, got {value!r}")
    return value  # type: ignore[no-any-return]  # narrowed by the membership test above


def _log_level(value: Any) -> str:
    levels = ("debug", "info", "warning", "error")
    if not isinstance(value, str) or value.lower() not in levels:
        raise ValueError(f"expected one of {', '.join(levels)}, got {value!r}")
    return value.lower()


def parse_http(value: Any) -> HttpListen:
    """Parse ``HOST:PORT`` (``[::1]:8480`` for IPv6)."""
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.removeprefix("[").removesuffix("]")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port from 0 to 65535, got {value!r}")
    return HttpListen(host, int(port_text))


def parse_broker_url(value: Any) -> BrokerAddress:
    """Parse ``mqtt://[user[:password]@]host[:port][?protocol=5|3.1.1]`` or ``mqtts://...``.

    The protocol package's parser, the one the agent uses too; its ``InvalidBrokerUrl`` is a
    ValueError naming the problem (and never showing the password).
    """
    return _parse_broker_url(_text(value))


def _db_url(value: Any, base: Path) -> str:
    """``sqlite:///relative.db`` resolves against ``base``; PostgreSQL URLs pass unchanged."""
    text = _text(value)
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f"expected sqlite:///PATH or postgresql://..., got {value!r}")
    driver = scheme.split("+", 1)[0]
    if driver == "sqlite":
        path = rest.removeprefix("/")
        if not path or path.startswith(":memory:"):
            raise ValueError(f"expected sqlite:///PATH to a file, got {value!r}")
        resolved = Path(path) if rest.startswith("//") else base / path
        return f"{scheme}:///{resolved.expanduser().resolve()}"
    if driver in ("postgresql", "postgres"):
        return text
    raise ValueError(f"expected a sqlite:/// or postgresql:// URL, got {value!r}")


@dataclass(frozen=True)
class Setting:
    """One configurable field and the names it goes by in each source."""

    field: str
    key: str  # TOML key; the flag has the same name with dashes
    parse: Callable[[Any], Any]
    is_path: bool = False  # relative values resolve against the source's base folder

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()


def _path(value: Any) -> Path:
    return Path(_text(value)).expanduser()


SETTINGS: tuple[Setting, ...] = (
    Setting("fleet", "fleet", _fleet),
    Setting("replica", "replica", _replica),
    Setting("http", "http", parse_http),
    Setting("http_tls_cert", "http_tls_cert", _path, is_path=True),
    Setting("http_tls_key", "http_tls_key", _path, is_path=True),
    Setting("public_url", "public_url", _public_url),
    Setting("data_dir", "data_dir", _path, is_path=True),
    Setting("db", "db", _text),  # resolved once data_dir is known
    Setting("broker", "broker_url", parse_broker_url),
    Setting("broker_ca", "broker_ca", _path, is_path=True),
    Setting("broker_cert", "broker_cert", _path, is_path=True),
    Setting("broker_key", "broker_key", _path, is_path=True),
    Setting("repository_dir", "repository_dir", _path, is_path=True),
    Setting("keys_dir", "keys_dir", _path, is_path=True),
    Setting("tokens_file", "tokens_file", _path, is_path=True),
    Setting("shared_group", "shared_group", _shared_group),
    Setting("desired_expiry_s", "desired_expiry_s", _positive_int),
    Setting("desired_resign_before_s", "desired_resign_before_s", _positive_int),
    Setting("device_timeout_s", "device_timeout_s", _positive_int),
    Setting("pending_expiry_s", "pending_expiry_s", _positive_int),
    Setting("telemetry_retention_s", "telemetry_retention_s", _positive_int),
    Setting("event_retention_s", "event_retention_s", _positive_int),
    Setting("ingest_batch_max", "ingest_batch_max", _positive_int),
    Setting("ingest_flush_interval_s", "ingest_flush_interval_s", _non_negative_float),
    Setting("ingest_decode_workers", "ingest_decode_workers", _non_negative_int),
    Setting("mqtt_receive_maximum", "mqtt_receive_maximum", _positive_int),
    Setting("mqtt_session_expiry_s", "mqtt_session_expiry_s", _positive_int),
    Setting("engine_tick_s", "engine_tick_s", _positive_float),
    Setting("maintenance_interval_s", "maintenance_interval_s", _positive_float),
    Setting("timestamp_refresh_before_s", "timestamp_refresh_before_s", _positive_int),
    Setting("max_body_bytes", "max_body_bytes", _positive_int),
    Setting("max_upload_bytes", "max_upload_bytes", _positive_int),
    Setting("sse_queue_max", "sse_queue_max", _positive_int),
    Setting("sse_heartbeat_s", "sse_heartbeat_s", _positive_float),
    Setting("shutdown_grace_s", "shutdown_grace_s", _non_negative_float),
    Setting("crash_point", "test_crash_point", _optional_text),
    Setting("log_format", "log_format", _log_format),
    Setting("log_level", "log_level", _log_level),
)
_BY_KEY = {s.key: s for s in SETTINGS}


def resolve_config(
    *,
    toml_data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    toml_source: str = "config file",
    toml_dir: Path | None = None,
    cwd: Path | None = None,
) -> ControlConfig:
    """Merge the sources in precedence order. Pure: no file or environment access.

    ``toml_dir`` is the folder of the config file (relative paths in it resolve there);
    ``cwd`` is where relative paths from the environment and flags resolve.
    """
    here = cwd or Path("/")
    unknown = sorted(set(toml_data or {}) - set(_BY_KEY))
    if unknown:
        raise ConfigError(f"{toml_source}: unknown setting(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    bases: dict[str, Path] = {}
    for setting in SETTINGS:
        sources: list[tuple[str, Any, Path]] = []
        if toml_data and setting.key in toml_data:
            origin = f"{toml_source} key {setting.key!r}"
            sources.append((origin, toml_data[setting.key], toml_dir or here))
        if env and setting.env in env:
            sources.append((f"environment variable {setting.env}", env[setting.env], here))
        if flags and flags.get(setting.key) is not None:
            flag = f"flag --{setting.key.replace('_', '-')}"
            sources.append((flag, flags[setting.key], here))
        for origin, raw, base in sources:  # later sources win
            try:
                parsed = setting.parse(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{origin}: {exc}") from exc
            values[setting.field] = base / parsed if setting.is_path else parsed
            bases[setting.field] = base
    if "fleet" not in values:
        raise ConfigError(
            f"the fleet is not set: give `fleet` in {toml_source} or {ENV_PREFIX}FLEET"
        )
    data_dir = values.get("data_dir") or (toml_dir if toml_dir is not None else DEFAULT_DATA_DIR)
    values["data_dir"] = data_dir
    for name, default in (
        ("repository_dir", "repository"),
        ("keys_dir", "keys"),
        ("tokens_file", "tokens.json"),
    ):
        values.setdefault(name, data_dir / default)
    try:
        values["db"] = _db_url(values.get("db", "sqlite:///control.db"), bases.get("db", data_dir))
    except ValueError as exc:
        raise ConfigError(f"db: {exc}") from exc
    broker = values.get("broker")
    if broker is not None and not broker.mqtt5 and values.get("shared_group"):
        raise ConfigError(
            f"shared_group {values['shared_group']!r} needs MQTT 5 (shared subscriptions), but "
            f"broker_url asks for ?protocol=3.1.1: drop one of them"
        )
    _check_broker_tls(values)
    if values.get("desired_resign_before_s", 2 * DAY_S) >= values.get(
        "desired_expiry_s", 7 * DAY_S
    ):
        raise ConfigError("desired_resign_before_s must be below desired_expiry_s")
    return dataclasses.replace(ControlConfig(), **values)


def _check_broker_tls(values: Mapping[str, Any]) -> None:
    if (values.get("broker_cert") is None) != (values.get("broker_key") is None):
        raise ConfigError("broker_cert and broker_key go together: give both or neither")
    if (values.get("http_tls_cert") is None) != (values.get("http_tls_key") is None):
        raise ConfigError("http_tls_cert and http_tls_key go together: give both or neither")
    broker = values.get("broker")
    if values.get("broker_ca") is not None and broker is not None and not broker.tls:
        try:
            require_tls_unless_loopback(broker.host, what="broker_url")
        except ValueError as exc:
            raise ConfigError(f"{exc} (broker_ca is set)") from exc


def load_config(config_file: Path | None, flags: Mapping[str, Any]) -> ControlConfig:
    """Read the TOML file (``--config`` or ``EDGELM_CONTROL_CONFIG``) and the environment."""
    env = dict(os.environ)
    raw_path = config_file or (
        Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None
    )
    toml_data: dict[str, Any] = {}
    toml_dir: Path | None = None
    if raw_path is not None:
        path = raw_path.expanduser().absolute()
        try:
            with open(path, "rb") as f:
                toml_data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        toml_dir = path.parent
    env = {k: v for k, v in env.items() if k != ENV_PREFIX + "CONFIG"}
    return resolve_config(
        toml_data=toml_data,
        env=env,
        flags=flags,
        toml_source=str(raw_path) if raw_path else "config file",
        toml_dir=toml_dir,
        cwd=Path.cwd(),
    )
