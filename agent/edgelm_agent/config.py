"""Agent configuration: defaults < TOML file < ``EDGELM_*`` environment < command-line flags.

This is the only module that reads ``os.environ``. Everything else receives a frozen
:class:`AgentConfig`. Each setting is declared once in :data:`SETTINGS` with its TOML key, its
environment variable and its parser, so the three sources cannot drift apart; the defaults live
on the dataclass, documented next to each field (and in ``docs/operator-guide.md``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgelm_agent.enrollment import (
    ROOT_FILE,
    Enrollment,
    fleet_dir,
    fleet_repository_mirror,
    load_enrollment,
)
from edgelm_agent.errors import ConfigError, shown
from edgelm_agent.inference.types import MAX_CONTEXT_LENGTH, MIN_CONTEXT_LENGTH

LogFormat = Literal["auto", "json", "console"]
ExecutionProvider = Literal["cpu", "cuda"]

DEFAULT_STATE_DIR = Path("/var/lib/edgelm")
DEFAULT_SOCKET = Path("/run/edgelm/agent.sock")
DEFAULT_HTTP_PORT = 8470


@dataclass(frozen=True)
class HttpListen:
    """Where the loopback HTTP listener binds. ``None`` in the config disables it."""

    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class AgentConfig:
    """Everything the daemon needs to start. Units are in the names."""

    #: Root of all persistent state (registry, database). Nothing in it is rewritten in place.
    state_dir: Path = DEFAULT_STATE_DIR
    #: Unix socket of the local API, created with mode 0660.
    socket_path: Path = DEFAULT_SOCKET
    #: Group that owns the Unix socket: its members may call every endpoint, admin ones
    #: included. ``None``: ``edgelm`` if that group exists, else the agent's primary group.
    socket_group: str | None = None
    #: Loopback HTTP listener; ``None`` disables it.
    http: HttpListen | None = field(
        default_factory=lambda: HttpListen("127.0.0.1", DEFAULT_HTTP_PORT)
    )
    #: Bearer token required on the HTTP listener. Mandatory to bind a non-loopback address.
    api_token: str | None = None
    #: Bearer token for admin operations (registry changes) over HTTP. ``None``: they are
    #: allowed over the Unix socket only. Must differ from ``api_token``.
    admin_token: str | None = None
    #: Per HTTP client (its bearer token, else its address): requests per second, refilled
    #: continuously (0 turns the limit off) ...
    http_client_rate_per_s: float = 20.0
    #: ... up to this many at once after a quiet spell ...
    http_client_burst: int = 40
    #: ... and at most this many requests in flight (0: no cap). Past either, 429. Half of
    #: max_queue: one client cannot fill the model's queue, and eight streams still fit.
    http_client_max_concurrent: int = 8
    #: Browser origins allowed to call the HTTP API (e.g. ``http://localhost:3000``).
    allowed_origins: tuple[str, ...] = ()
    #: Model to serve: a GGUF file or an ONNX GenAI folder.
    model_path: Path | None = None
    #: Embedding model served at /v1/embeddings beside the chat model: an installed model
    #: of role ``embedding`` (``name`` or ``name@version``), or a GGUF file's path, which is
    #: imported as one. ``None``: this agent serves no embeddings.
    embedding_model: str | None = None
    #: CPU threads for generation; ``None`` means one per available core.
    threads: int | None = None
    #: Context window in tokens, capped at the model's trained length.
    context_length: int = 4096
    #: Reply length for a request that sets no ``max_tokens``: long enough for a kiosk's
    #: answer, short enough that a forgotten limit cannot run a small model for minutes.
    default_max_tokens: int = 512
    #: llama.cpp layers offloaded to the GPU; ``None`` means all of them when the llama.cpp
    #: build supports GPU offload (a CUDA build on a Jetson), else 0.
    gpu_layers: int | None = None
    #: Where onnxruntime-genai runs the model: ``cpu``, or ``cuda`` (Jetson, with a CUDA build).
    onnx_provider: ExecutionProvider = "cpu"
    #: Memory, in bytes, that models may take together: the active model and the embedding
    #: model count against it, and other installed models are loaded on demand while they
    #: fit, least recently used first out. 0: only the active model serves (a request for
    #: another model is a 404), as before this setting existed.
    ram_budget_bytes: int = 0
    #: A model loaded on demand is unloaded after this many seconds without a request (a
    #: request's ``keep_alive`` overrides it); ``None`` (``never``): kept until room is
    #: needed. Never applies to the active model or the embedding model.
    idle_unload_s: float | None = 300.0
    #: Requests allowed to wait while the model is busy; one more is answered 429.
    max_queue: int = 16
    #: ``Retry-After`` seconds sent with a 429.
    retry_after_s: int = 1
    #: Largest request body accepted, in bytes; larger bodies get 413.
    max_body_bytes: int = 1 << 20
    #: A connection whose next request's headers have not arrived in this time is closed:
    #: bounds half-open, trickling and idle keep-alive connections alike.
    http_idle_timeout_s: float = 30.0
    #: A request body must arrive within this time once its headers have; else 408.
    http_body_timeout_s: float = 30.0
    #: Open TCP connections allowed at once (lowered to keep file descriptors in reserve for
    #: the Unix socket, the database and models); one more is answered 503.
    max_http_connections: int = 256
    #: How long in-flight generations may run after SIGTERM before they are cancelled.
    shutdown_grace_s: float = 10.0
    #: Mirrors of the fleet's TUF repository (URLs or folders), tried in order. Empty: this is
    #: a standalone device that signs its own models into a local repository.
    repository_mirrors: tuple[str, ...] = ()
    #: The fleet repository's root.json, the trust anchor, used on first contact.
    repository_root: Path | None = None
    #: Free disk kept beyond a model's size before a download or import is allowed.
    disk_margin_bytes: int = 256 << 20
    #: When interactive requests and jobs both wait, every Nth turn goes to a job.
    jobs_background_every: int = 4
    #: Finished jobs are forgotten after this long …
    jobs_retention_s: float = 7 * 24 * 3600.0
    #: … and beyond this many.
    jobs_retention_count: int = 10_000
    #: Jobs that may wait in the queue at once; one more is refused with 507.
    max_queued_jobs: int = 10_000
    #: Bytes of requests and metadata the waiting jobs may hold together; past it, 507.
    max_queued_job_bytes: int = 256 << 20
    #: Telemetry messages the outbox keeps while offline; older ones are dropped.
    outbox_telemetry_max: int = 10_000
    #: Bytes of results and events the outbox keeps; past it, upstream jobs are refused.
    outbox_durable_max_bytes: int = 64 << 20
    #: Fleet devices: how often a telemetry batch is sent (none while offline).
    telemetry_interval_s: float = 60.0
    #: Fleet devices: how long the broker keeps this device's MQTT session while it is
    #: offline (messages for it queue meanwhile); days, not AWS IoT's one hour.
    mqtt_session_expiry_s: int = 7 * 24 * 3600
    #: Fleet devices: resend results and events the control plane has not acknowledged
    #: after this long (it deduplicates by message id).
    sync_ack_timeout_s: float = 30.0
    #: Fleet devices: a download that failed for a passing reason (the network, a repository
    #: being re-signed) is tried again after a pause that doubles from this ...
    sync_retry_min_s: float = 5.0
    #: ... up to this, with jitter, for as long as its desired state stands.
    sync_retry_max_s: float = 300.0
    #: Fleet devices: after the control plane announces new repository metadata, the device
    #: refreshes its own copy within this many seconds (at random, so a fleet does not ask the
    #: repository all at once).
    sync_refresh_jitter_s: float = 30.0
    #: Fleet devices: a desired state signed by a key the device does not know makes it
    #: refresh its metadata (the director's key may have rotated); such refreshes start at
    #: least this many seconds apart, so a flood of them from the broker costs little.
    sync_key_refresh_interval_s: float = 30.0
    #: Testing only: the process kills itself with SIGKILL at this named point.
    crash_point: str | None = None
    #: The fleet this device is enrolled in (``edgelm agent enroll``); read from the state
    #: directory, never from a setting. ``None``: a standalone device.
    enrollment: Enrollment | None = None
    #: ``auto`` writes JSON lines unless stdout is a terminal.
    log_format: LogFormat = "auto"
    log_level: str = "info"

    def effective_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        return max(1, len(os.sched_getaffinity(0)))


# --- parsers: each takes the raw value from TOML (typed) or env/flags (str) ---------------------


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path, got {value!r}")
    return Path(value).expanduser()


def _optional_path(value: Any) -> Path | None:
    return None if value in (None, "") else _path(value)


def _integer(value: Any, expected: str) -> int:
    """An integer from TOML (typed) or text (env, flags), with a message a person can act on."""
    if isinstance(value, bool):
        raise ValueError(f"expected {expected}, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())
    raise ValueError(f"expected {expected}, got {value!r}")


def _number(value: Any, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {expected}, got {value!r}")
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an integer of hundreds of digits
        raise ValueError(f"expected {expected}, got {shown(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected {expected}, got {value!r}")
    return number


def _positive_int(value: Any) -> int:
    number = _integer(value, "a positive integer")
    if number <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _optional_positive_int(value: Any) -> int | None:
    if value in (None, "", 0, "0", "auto"):
        return None
    number = _integer(value, "a positive integer or 'auto'")
    if number <= 0:
        raise ValueError(f"expected a positive integer or 'auto', got {value!r}")
    return number


def _non_negative_int(value: Any) -> int:
    number = _integer(value, "an integer >= 0")
    if number < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return number


def _optional_non_negative_int(value: Any) -> int | None:
    return None if value in (None, "", "auto") else _non_negative_int(value)


def _context_length(value: Any) -> int:
    expected = f"an integer from {MIN_CONTEXT_LENGTH} to {MAX_CONTEXT_LENGTH}"
    number = _integer(value, expected)
    if not MIN_CONTEXT_LENGTH <= number <= MAX_CONTEXT_LENGTH:
        raise ValueError(f"expected {expected}, got {shown(value)}")
    return number


def _non_negative_float(value: Any) -> float:
    number = _number(value, "a number >= 0")
    if number < 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")
    return number


def _positive_float(value: Any) -> float:
    number = _number(value, "a number > 0")
    if number <= 0:
        raise ValueError(f"expected a number > 0, got {value!r}")
    return number


def _idle_unload(value: Any) -> float | None:
    """Seconds >= 0, or ``never`` (also -1) for no idle unload."""
    if value in (None, "never", "-1", -1):
        return None
    number = _number(value, "a number of seconds >= 0, or 'never'")
    if number < 0:
        raise ValueError(f"expected a number of seconds >= 0, or 'never', got {value!r}")
    return number


def _onnx_provider(value: Any) -> ExecutionProvider:
    if value not in ("cpu", "cuda"):
        raise ValueError(f"expected cpu or cuda, got {value!r}")
    return value  # type: ignore[no-any-return]  # narrowed by the membership test above


def _optional_str(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _origins(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, list):
        items = [str(v).strip() for v in value]
    else:
        raise ValueError(f"expected a list of origins, got {value!r}")
    return tuple(v.rstrip("/") for v in items if v)


def _log_format(value: Any) -> LogFormat:
    if value not in ("auto", "json", "console"):
        raise ValueError(f"expected auto, json or console, got {value!r}")
    return value  # type: ignore[no-any-return]  # narrowed by the membership test above


def _log_level(value: Any) -> str:
    levels = ("debug", "info", "warning", "error")
    if not isinstance(value, str) or value.lower() not in levels:
        raise ValueError(f"expected one of {', '.join(levels)}, got {value!r}")
    return value.lower()


def parse_http(value: Any) -> HttpListen | None:
    """Parse ``HOST:PORT`` (``[::1]:8470`` for IPv6); ``off`` or ``none`` disables HTTP."""
    if value is None or (isinstance(value, str) and value.lower() in ("", "off", "none")):
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.removeprefix("[").removesuffix("]")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port from 0 to 65535, got {value!r}")
    port = int(port_text)
    return HttpListen(host, port)


@dataclass(frozen=True)
class Setting:
    """One configurable field and the names it goes by in each source."""

    field: str
    key: str  # TOML key; the flag has the same name with dashes
    parse: Callable[[Any], Any]

    @property
    def env(self) -> str:
        return "EDGELM_" + self.key.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("state_dir", "state_dir", _path),
    Setting("socket_path", "socket", _path),
    Setting("socket_group", "socket_group", _optional_str),
    Setting("http", "http", parse_http),
    Setting("api_token", "api_token", _optional_str),
    Setting("admin_token", "admin_token", _optional_str),
    Setting("http_client_rate_per_s", "http_client_rate_per_s", _non_negative_float),
    Setting("http_client_burst", "http_client_burst", _positive_int),
    Setting("http_client_max_concurrent", "http_client_max_concurrent", _non_negative_int),
    Setting("allowed_origins", "allowed_origins", _origins),
    Setting("model_path", "model", _optional_path),
    Setting("embedding_model", "embedding_model", _optional_str),
    Setting("threads", "threads", _optional_positive_int),
    Setting("context_length", "context_length", _context_length),
    Setting("default_max_tokens", "default_max_tokens", _positive_int),
    Setting("gpu_layers", "gpu_layers", _optional_non_negative_int),
    Setting("onnx_provider", "onnx_provider", _onnx_provider),
    Setting("ram_budget_bytes", "ram_budget_bytes", _non_negative_int),
    Setting("idle_unload_s", "idle_unload_s", _idle_unload),
    Setting("max_queue", "max_queue", _positive_int),
    Setting("retry_after_s", "retry_after_s", _positive_int),
    Setting("max_body_bytes", "max_body_bytes", _positive_int),
    Setting("http_idle_timeout_s", "http_idle_timeout_s", _positive_float),
    Setting("http_body_timeout_s", "http_body_timeout_s", _positive_float),
    Setting("max_http_connections", "max_http_connections", _positive_int),
    Setting("shutdown_grace_s", "shutdown_grace_s", _non_negative_float),
    Setting("repository_mirrors", "repository_mirrors", _origins),
    Setting("repository_root", "repository_root", _optional_path),
    Setting("disk_margin_bytes", "disk_margin_bytes", _non_negative_int),
    Setting("jobs_background_every", "jobs_background_every", _positive_int),
    Setting("jobs_retention_s", "jobs_retention_s", _non_negative_float),
    Setting("jobs_retention_count", "jobs_retention_count", _positive_int),
    Setting("max_queued_jobs", "max_queued_jobs", _positive_int),
    Setting("max_queued_job_bytes", "max_queued_job_bytes", _positive_int),
    Setting("outbox_telemetry_max", "outbox_telemetry_max", _positive_int),
    Setting("outbox_durable_max_bytes", "outbox_durable_max_bytes", _positive_int),
    Setting("telemetry_interval_s", "telemetry_interval_s", _positive_float),
    Setting("mqtt_session_expiry_s", "mqtt_session_expiry_s", _positive_int),
    Setting("sync_ack_timeout_s", "sync_ack_timeout_s", _positive_float),
    Setting("sync_retry_min_s", "sync_retry_min_s", _positive_float),
    Setting("sync_retry_max_s", "sync_retry_max_s", _positive_float),
    Setting("sync_refresh_jitter_s", "sync_refresh_jitter_s", _non_negative_float),
    Setting("sync_key_refresh_interval_s", "sync_key_refresh_interval_s", _non_negative_float),
    Setting("crash_point", "test_crash_point", _optional_str),
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
) -> AgentConfig:
    """Merge the sources in precedence order. Pure: no file or environment access."""
    values: dict[str, Any] = {}
    unknown = sorted(set(toml_data or {}) - set(_BY_KEY))
    if unknown:
        raise ConfigError(f"{toml_source}: unknown setting(s) {', '.join(unknown)}")
    for setting in SETTINGS:
        sources: list[tuple[str, Any]] = []
        if toml_data and setting.key in toml_data:
            sources.append((f"{toml_source} key {setting.key!r}", toml_data[setting.key]))
        if env and setting.env in env:
            sources.append((f"environment variable {setting.env}", env[setting.env]))
        if flags and flags.get(setting.key) is not None:
            sources.append((f"flag --{setting.key.replace('_', '-')}", flags[setting.key]))
        for origin, raw in sources:  # later sources win
            try:
                values[setting.field] = setting.parse(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{origin}: {exc}") from exc
    return dataclasses.replace(AgentConfig(), **values)


def load_config(config_file: Path | None, flags: Mapping[str, Any]) -> AgentConfig:
    """Read the TOML file (``--config`` or ``EDGELM_CONFIG``) and the environment, then resolve;
    a device enrolled in a fleet gets its fleet's repository (:func:`with_enrollment`)."""
    return with_enrollment(load_settings(config_file, flags))


def load_settings(config_file: Path | None, flags: Mapping[str, Any]) -> AgentConfig:
    """The configuration alone, without what the installed enrollment adds: enrolling again
    starts from this, so that the new fleet's repository replaces the previous fleet's
    rather than being shadowed by it."""
    env = dict(os.environ)
    path = config_file or (Path(env["EDGELM_CONFIG"]) if env.get("EDGELM_CONFIG") else None)
    toml_data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                toml_data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return resolve_config(toml_data=toml_data, env=env, flags=flags, toml_source=str(path))


def with_enrollment(config: AgentConfig) -> AgentConfig:
    """A device enrolled in a fleet fetches models from the fleet's repository and trusts its
    root, unless the configuration names other mirrors (a site's caching mirror, say). With
    a fleet CA, an ``https://`` fleet repository is verified against that CA alone.

    ``config`` is the configuration alone (:func:`load_settings`): one that an earlier
    enrollment filled in already would keep that fleet's mirrors."""
    enrollment = load_enrollment(config.state_dir)
    if enrollment is None:
        return config
    mirrors = config.repository_mirrors or (fleet_repository_mirror(config.state_dir, enrollment),)
    root = config.repository_root or fleet_dir(config.state_dir) / ROOT_FILE
    return dataclasses.replace(
        config, enrollment=enrollment, repository_mirrors=mirrors, repository_root=root
    )


def env_socket_path() -> Path:
    """Socket path a CLI client should use when no ``--socket`` is given."""
    raw = os.environ.get("EDGELM_SOCKET")
    return Path(raw).expanduser() if raw else DEFAULT_SOCKET
