"""The store's tables, as SQLAlchemy Core metadata: one schema for SQLite and PostgreSQL.

The migrations in :mod:`edgelm_control.store.migrations` create exactly these tables (a test
compares the migrated database with this metadata), and the queries use them. Conventions:

* times are integer milliseconds since the epoch (``*_ms``) or whole seconds where the wire
  uses seconds (``*_s``: a desired state's ``issued_at`` and ``expires``);
* free JSON (requests, results, labels, reported states, settings) is stored as JSON *text*,
  not ``jsonb``: a job's request or result may hold ``\\u0000``, which ``jsonb`` refuses, and
  text keeps exactly what was received; nothing queries inside it;
* a model is ``name@version`` (140 characters: two 64-character parts and the ``@``);
* every state column is a short string (the value of a ``StrEnum``), so rows read the same
  in a SQL shell as in the API.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

ID = 64  # fleet, device, rollout and job ids
MODEL = 140  # name@version
SHA256 = 64
MESSAGE_ID = 32
PATH = 512
STATE = 16

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL's BIGINT identity is wider.
AUTO_ID = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

devices = Table(
    "devices",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("hardware_class", String(64)),  # None until reported or registered
    Column("labels", Text, nullable=False),  # JSON object of str -> str
    Column("presence", String(STATE), nullable=False),  # online | offline | unknown
    Column("agent_version", String(64)),
    Column("first_seen_ms", BigInteger, nullable=False),  # registered or first heard from
    Column("last_seen_ms", BigInteger),  # last message of any kind; None: never heard from
    Column("online_since_ms", BigInteger),  # when it last came online
    Column("presence_changed_ms", BigInteger),
    Column("registered_ms", BigInteger),  # POST /api/v1/devices
    Column("active_model", String(MODEL)),
    Column("active_sha256", String(SHA256)),
    Column("previous_model", String(MODEL)),
    Column("applied_sequence", BigInteger, nullable=False),  # last desired state it applied
    Column("reported_state", Text),  # JSON: the last ``state`` body as received
    Column("state_updated_ms", BigInteger),
    Index(None, "hardware_class"),
    Index(None, "presence"),
)

desired_states = Table(
    "desired_states",
    metadata,
    Column("device_id", String(ID), primary_key=True),
    # The device's sequence counter: the last one issued. It only grows (an atomic upsert),
    # whatever happens to the document below.
    Column("sequence", BigInteger, nullable=False),
    Column("rollout_id", String(ID)),
    Column("model", String(MODEL)),  # None: a release (the signed document has no target)
    Column("target_path", String(PATH)),
    Column("target_length", BigInteger),
    Column("target_sha256", String(SHA256)),
    Column("issued_at_s", BigInteger),
    Column("expires_s", BigInteger),
    Column("document", Text),  # the signed document, as published
    Column("published_sequence", BigInteger, nullable=False),  # the last one the broker took
    Column("updated_ms", BigInteger, nullable=False),
    Index(None, "expires_s"),
)

model_targets = Table(
    "model_targets",
    metadata,
    Column("path", String(PATH), primary_key=True),
    Column("model", String(MODEL), nullable=False, unique=True),
    Column("name", String(64), nullable=False),
    Column("version", String(64), nullable=False),
    Column("length", BigInteger, nullable=False),
    Column("sha256", String(SHA256), nullable=False),
    Column("format", String(STATE), nullable=False),
    Column("backend", String(32), nullable=False),
    Column("quantization", String(64), nullable=False),
    Column("context_length", Integer, nullable=False),
    Column("min_ram_bytes", BigInteger, nullable=False),
    Column("custom", Text, nullable=False),  # JSON: the target's custom["edgelm"]
    Column("targets_version", Integer, nullable=False),  # the targets metadata that added it
    Column("added_ms", BigInteger, nullable=False),
)

repository_state = Table(
    "repository_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    # Compare-and-set on this version serialises pushes across replicas.
    Column("targets_version", Integer, nullable=False),
    Column("timestamp_version", Integer, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("model", String(MODEL), nullable=False),
    Column("target_path", String(PATH), nullable=False),
    Column("target_length", BigInteger, nullable=False),
    Column("target_sha256", String(SHA256), nullable=False),
    Column("selector", Text, nullable=False),  # JSON
    Column("settings", Text, nullable=False),  # JSON (RolloutSettings.to_json)
    Column("baselines", Text, nullable=False),  # JSON: class -> health figures, at creation
    Column("state", String(STATE), nullable=False),
    Column("current_wave", Integer, nullable=False),
    Column("wave_count", Integer, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("ended_ms", BigInteger),
    Index(None, "state"),
    Index(None, "created_ms", "id"),
)

rollout_waves = Table(
    "rollout_waves",
    metadata,
    Column("rollout_id", String(ID), primary_key=True),
    Column("wave", Integer, primary_key=True, autoincrement=False),
    Column("started_ms", BigInteger),
    Column("decided_ms", BigInteger),
    Column("verdict", String(STATE)),  # None | passed | failed | accepted
    Column("code", String(32)),
    Column("reason", Text),
    Column("tally", Text),  # JSON
)

rollout_devices = Table(
    "rollout_devices",
    metadata,
    Column("rollout_id", String(ID), primary_key=True),
    Column("device_id", String(ID), primary_key=True),
    Column("wave", Integer, nullable=False),
    Column("state", String(STATE), nullable=False),
    Column("reason", Text),
    Column("previous_model", String(MODEL)),  # what it ran when it joined
    Column("previous_path", String(PATH)),  # that model's target, if the repository has it
    Column("previous_length", BigInteger),
    Column("previous_sha256", String(SHA256)),
    Column("desired_sequence", BigInteger),  # the desired state its wave start issued
    Column("abort_sequence", BigInteger),  # the one naming the previous model, after abort
    Column("pending_since_ms", BigInteger),
    Column("last_report_ms", BigInteger),
    Column("health_tokens_per_s", Float),
    Column("health_ttft_ms", Float),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Index(None, "device_id", "state"),
    Index(None, "rollout_id", "wave"),
    Index(None, "state"),
)

device_events = Table(
    "device_events",
    metadata,
    Column("message_id", String(MESSAGE_ID), primary_key=True),  # dedupe: stored once
    Column("device_id", String(ID), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("model", String(MODEL)),
    Column("desired_sequence", BigInteger),
    Column("rollout_id", String(ID)),
    Column("reason", Text),
    Column("health_tokens_per_s", Float),
    Column("health_ttft_ms", Float),
    Column("progress_done_bytes", BigInteger),
    Column("progress_total_bytes", BigInteger),
    Column("sent_ms", BigInteger, nullable=False),  # the device's clock, informational
    Column("received_ms", BigInteger, nullable=False),
    Column("processed_ms", BigInteger),  # None until the rollout engine has applied it
    Index(None, "device_id", "received_ms"),
    Index(None, "processed_ms"),
    Index(None, "kind", "model"),
)

telemetry = Table(
    "telemetry",
    metadata,
    Column("id", AUTO_ID, primary_key=True, autoincrement=True),
    Column("device_id", String(ID), nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    Column("sent_ms", BigInteger, nullable=False),
    Column("window_s", Float, nullable=False),
    Column("model", String(MODEL)),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("tokens_per_s_p50", Float),
    Column("tokens_per_s_p90", Float),
    Column("ttft_ms_p50", Float),
    Column("ttft_ms_p90", Float),
    Column("queue_depth", BigInteger, nullable=False),
    Column("cpu_percent", Float),
    Column("memory_bytes", BigInteger),
    Column("memory_total_bytes", BigInteger),
    Column("disk_free_bytes", BigInteger),
    Column("temperature_c", Float),
    Index(None, "device_id", "id"),
    Index(None, "received_ms"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("request", Text, nullable=False),  # JSON text: may hold \u0000
    Column("selector", Text, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("ttl_s", Float),
    Column("max_attempts", Integer, nullable=False),
    Column("metadata", Text),
    Column("wait_for_model", Boolean, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Index(None, "created_ms", "id"),
)

job_devices = Table(
    "job_devices",
    metadata,
    Column("job_id", String(ID), primary_key=True),
    Column("device_id", String(ID), primary_key=True),
    Column("message_id", String(MESSAGE_ID), nullable=False, unique=True),  # the job envelope
    Column("state", String(STATE), nullable=False),
    Column("sent_ms", BigInteger),
    Column("finished_ms", BigInteger),
    Column("result_message_id", String(MESSAGE_ID)),
    Index(None, "state"),
)

job_results = Table(
    "job_results",
    metadata,
    Column("message_id", String(MESSAGE_ID), primary_key=True),  # dedupe: stored once
    Column("job_message_id", String(MESSAGE_ID), nullable=False),
    Column("device_id", String(ID), nullable=False),
    Column("state", String(STATE), nullable=False),
    Column("metadata", Text),
    Column("result", Text),
    Column("error", Text),
    Column("sent_ms", BigInteger, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    Index(None, "job_message_id"),
)

device_revocations = Table(
    "device_revocations",
    metadata,
    # One row per revoked device, for good: a revoked id never comes back (see .revocations).
    Column("device_id", String(ID), primary_key=True),
    Column("revoked_ms", BigInteger, nullable=False),  # the first revocation; repeats keep it
    Column("reason", Text),  # the operator's words, as given; None: none given
)

operator_tokens = Table(
    "operator_tokens",
    metadata,
    Column("name", String(ID), primary_key=True),
    Column("sha256", String(SHA256), nullable=False, unique=True),
    Column("created_at_s", BigInteger, nullable=False),
    Column("source", String(STATE), nullable=False),  # "file": from tokens.json
)
