"""Hypothesis strategies for the wire contract, written from docs/protocol.md, not the code.

Patterns and ranges are restated here as literals so a test does not inherit a mistake from the
constant it tests.
"""

from __future__ import annotations

import operator
import string

from hypothesis import strategies as st

from edgelm_protocol import (
    Ack,
    Announce,
    Body,
    Channel,
    DesiredDocument,
    Envelope,
    Event,
    EventKind,
    Health,
    JobError,
    JobOutcome,
    JobResult,
    JSONObject,
    JSONValue,
    MessageType,
    ModelRef,
    Percentiles,
    Presence,
    PresenceStatus,
    Progress,
    RemoteJob,
    ReportedState,
    Signature,
    Telemetry,
    Topic,
)
from edgelm_protocol.desired import DesiredState, TargetRef

MAX_SAFE_INT = 2**53 - 1
DEVICE_TO_CONTROL = {MessageType.PRESENCE, MessageType.STATE, MessageType.TELEMETRY}
DEVICE_TO_CONTROL |= {MessageType.EVENT, MessageType.JOB_RESULT}

# Built from alphabets rather than st.from_regex, which is several times slower to draw from.
_ALNUM = string.ascii_letters + string.digits
_HEX = "0123456789abcdef"


def _word(first: str, rest: str, max_rest: int) -> st.SearchStrategy[str]:
    return st.builds(operator.add, st.sampled_from(first), st.text(rest, max_size=max_rest))


ids = _word(_ALNUM, _ALNUM + "._-", 63).filter(lambda value: value != "control")
short_ids = _word(_ALNUM, _ALNUM + "._-", 62)
message_ids = st.text(_HEX, min_size=32, max_size=32)
sha256s = st.text(_HEX, min_size=64, max_size=64)
signatures_hex = st.text(_HEX, min_size=128, max_size=128)
_LOWER = string.ascii_lowercase + string.digits
model_names = _word(_LOWER, _LOWER + "._-", 63).filter(lambda value: ".." not in value)
model_versions = _word(_ALNUM, _ALNUM + "._+-", 63).filter(lambda value: ".." not in value)
model_keys = st.builds(lambda name, version: f"{name}@{version}", model_names, model_versions)

# Characters an id must refuse: MQTT wildcards and level separator, the broker's "$", and every
# whitespace and control character.
FORBIDDEN_IN_IDS = st.sampled_from(["+", "#", "/", "$", "\x00", " ", "\t", "\n", "\u00a0"]) | (
    st.characters(categories=["Cc", "Zs", "Zl", "Zp"])
)


@st.composite
def bad_ids(draw: st.DrawFn) -> str:
    """A valid id with one forbidden character inserted somewhere (the start included)."""
    base = draw(short_ids)
    position = draw(st.integers(0, len(base)))
    return base[:position] + draw(FORBIDDEN_IN_IDS) + base[position:]


_TEXT_CHARS = st.characters(exclude_categories=["Cs", "Cc"])
texts = st.text(_TEXT_CHARS, min_size=1, max_size=64)
prose = st.text(
    st.characters(exclude_categories=["Cs", "Cc"]) | st.sampled_from("\n\t"), min_size=1
)
counts = st.integers(0, MAX_SAFE_INT)
numbers = st.floats(0, 1e12, allow_nan=False, allow_infinity=False)
optional_numbers = st.none() | numbers

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_TEXT_CHARS | st.sampled_from("\n\x00\x1b"), max_size=20)
)
json_values: st.SearchStrategy[JSONValue] = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(_TEXT_CHARS, max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
json_objects: st.SearchStrategy[JSONObject] = st.dictionaries(
    st.text(_TEXT_CHARS, max_size=10), json_values, max_size=4
)

# What canonical JSON (and so a signed document) can hold: no floats.
canonical_objects: st.SearchStrategy[JSONObject] = st.dictionaries(
    st.text(_TEXT_CHARS, max_size=10),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(_TEXT_CHARS, max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(_TEXT_CHARS, max_size=10), children, max_size=4)
        ),
        max_leaves=12,
    ),
    max_size=6,
)

# What a fuzzer sends: any JSON value, including lone surrogates (st.characters() yields them).
hostile_json_values: st.SearchStrategy[object] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(), max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(), max_size=10), children, max_size=4)
    ),
    max_leaves=16,
)

model_refs = st.builds(ModelRef, name=model_names, version=model_versions, sha256=sha256s)


@st.composite
def progresses(draw: st.DrawFn) -> Progress:
    total = draw(counts)
    return Progress(done_bytes=draw(st.integers(0, total)), total_bytes=total)


presences = st.builds(Presence, status=st.sampled_from(PresenceStatus), agent_version=texts)
reported_states = st.builds(
    ReportedState,
    active=st.none() | model_refs,
    previous=st.none() | model_refs,
    installed=st.lists(model_refs, max_size=5).map(tuple),
    hardware_class=texts,
    labels=st.dictionaries(ids, st.text(_TEXT_CHARS, max_size=30), max_size=5),
    ram_bytes=counts,
    accelerator=texts,
    disk_free_bytes=counts,
    desired_sequence=counts,
)
percentiles = st.builds(Percentiles, p50=optional_numbers, p90=optional_numbers)
telemetries = st.builds(
    Telemetry,
    window_s=st.floats(0, 86_400, exclude_min=True),
    model=st.none() | model_keys,
    requests=counts,
    errors=counts,
    tokens_per_s=percentiles,
    ttft_ms=percentiles,
    queue_depth=counts,
    cpu_percent=optional_numbers,
    memory_bytes=st.none() | counts,
    memory_total_bytes=st.none() | counts,
    disk_free_bytes=st.none() | counts,
    temperature_c=st.none() | st.floats(-273.15, 1000),
)
events = st.builds(
    Event,
    seq=counts,
    kind=st.sampled_from(EventKind),
    model=st.none() | model_keys,
    desired_sequence=st.none() | counts,
    rollout=st.none() | ids,
    reason=st.none() | prose.filter(lambda text: len(text) <= 2048),
    health=st.none() | st.builds(Health, tokens_per_s=optional_numbers, ttft_ms=optional_numbers),
    progress=st.none() | progresses(),
)
job_errors = st.builds(
    JobError,
    code=texts,
    message=prose.filter(lambda text: len(text) <= 4096),
    details=json_objects.map(
        lambda extra: {k: v for k, v in extra.items() if k not in {"code", "message"}}
    ),
)
job_results = st.builds(
    JobResult,
    job_id=message_ids,
    state=st.sampled_from(JobOutcome),
    metadata=st.none() | json_objects,
    result=st.none() | json_objects,
    error=st.none() | job_errors,
)
remote_jobs = st.builds(
    RemoteJob,
    request=json_objects,
    priority=st.integers(-100, 100),
    ttl_s=st.none() | st.floats(0, 31_536_000, exclude_min=True),
    metadata=st.none() | json_objects,
    max_attempts=st.integers(1, 10),
    wait_for_model=st.booleans(),
)
acks = st.builds(Ack, ids=st.lists(message_ids, min_size=1, max_size=20).map(tuple))
announces = st.builds(Announce, timestamp_version=st.integers(1, MAX_SAFE_INT))


@st.composite
def desired_states(
    draw: st.DrawFn, fleet: str | None = None, device: str | None = None
) -> DesiredState:
    issued_at = draw(st.integers(0, 2**40))
    return DesiredState(
        fleet=fleet if fleet is not None else draw(ids),
        device=device if device is not None else draw(ids),
        sequence=draw(st.integers(1, MAX_SAFE_INT)),
        issued_at=issued_at,
        expires=draw(st.integers(issued_at + 1, 2**41)),
        rollout=draw(st.none() | ids),
        target=draw(
            st.none()  # a release
            | st.builds(
                TargetRef,
                path=st.builds("models/{}/{}/model.gguf".format, model_names, model_versions),
                length=counts,
                sha256=sha256s,
            )
        ),
    )


desired_documents = st.builds(
    DesiredDocument,
    signed=desired_states().map(DesiredState.to_json) | json_objects,
    signatures=st.lists(
        st.builds(Signature, keyid=sha256s, sig=signatures_hex),
        max_size=3,
    ).map(tuple),
)

BODIES: dict[MessageType, st.SearchStrategy[Body]] = {
    MessageType.PRESENCE: presences,
    MessageType.STATE: reported_states,
    MessageType.TELEMETRY: telemetries,
    MessageType.EVENT: events,
    MessageType.JOB_RESULT: job_results,
    MessageType.DESIRED: desired_documents,
    MessageType.JOB: remote_jobs,
    MessageType.ACK: acks,
    MessageType.ANNOUNCE: announces,
}


@st.composite
def addressed_envelopes(
    draw: st.DrawFn, message_type: MessageType | None = None
) -> tuple[Topic, Envelope]:
    """A valid envelope and the topic it travels on."""
    if message_type is None:
        message_type = draw(st.sampled_from(MessageType))
    fleet, device = draw(ids), draw(ids)
    sender = device if message_type in DEVICE_TO_CONTROL else "control"
    envelope = Envelope(
        id=draw(message_ids),
        sender=sender,
        ts_ms=draw(counts),
        body=draw(BODIES[message_type]),
    )
    return Topic.for_type(fleet, device, message_type), envelope


@st.composite
def topics(draw: st.DrawFn) -> Topic:
    """Any valid topic: a device channel of any device, or a fleet's announce."""
    channel = draw(st.sampled_from(Channel))
    device = None if channel is Channel.ANNOUNCE else draw(ids)
    return Topic(fleet=draw(ids), channel=channel, device=device)
