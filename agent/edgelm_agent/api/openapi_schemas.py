"""JSON Schemas (2020-12, as OpenAPI 3.1 uses) of the agent's request and response bodies.

Request schemas restate what the validators accept, and take their limits from the validators'
own constants (:mod:`edgelm_agent.generation.openai_schema`, :mod:`edgelm_agent.jobs.submission`,
the model name patterns), so a changed limit changes the document too.

The fields of the two generation endpoints live in one table, :data:`GENERATION_FIELDS` (plus
:data:`CHAT_FIELDS` and :data:`COMPLETION_FIELDS` for what differs): a new OpenAI field is one
entry there, and ``/v1/jobs`` takes it too. Fields the agent refuses unless they ask for nothing
(``logprobs``…) come from ``openai_schema.UNSUPPORTED``, each with the values it accepts; a
feature that becomes supported leaves that table and gets its own entry here. Structured
output, tools and presets are described in :mod:`.openapi_tools`, with the rules that relate
one field to another.
"""

from __future__ import annotations

from edgelm_agent.api.openapi_parts import (
    BOOL,
    FREE,
    INT,
    JSON,
    NON_EMPTY,
    NULL,
    NUM,
    STR,
    UNIX_TIME,
    Schema,
    nullable,
    obj,
    ref,
)
from edgelm_agent.api.openapi_tools import CHAT_RULES, GRAMMAR, ONE_CONSTRAINT
from edgelm_agent.api.openapi_tools import COMPONENTS as OUTPUT_COMPONENTS
from edgelm_agent.generation.embeddings import MAX_INPUTS
from edgelm_agent.generation.openai_schema import MAX_STOP_SEQUENCES, ROLES, UNSUPPORTED
from edgelm_agent.inference.types import MAX_CONTEXT_LENGTH, MIN_CONTEXT_LENGTH
from edgelm_agent.jobs.lifecycle import JobState
from edgelm_agent.jobs.submission import (
    MAX_DEADLINE,
    MAX_KEY_CHARS,
    MAX_METADATA_BYTES,
    MAX_TTL_S,
)
from edgelm_agent.residency import KEEP_ALIVE_PATTERN
from edgelm_protocol.ids import MODEL_NAME_PATTERN, MODEL_VERSION_PATTERN
from edgelm_protocol.presets import PRESET_NAME_RE

__all__ = ["COMPONENTS", "FREE", "JSON", "STR", "Schema", "event_stream", "ref"]


def _name_pattern(pattern: str) -> Schema:
    # check_name and check_version also refuse "..", a path escape in a target path.
    return {"type": "string", "pattern": f"^(?!.*\\.\\.){pattern}$"}


MODEL_NAME = _name_pattern(MODEL_NAME_PATTERN.pattern)
MODEL_VERSION = _name_pattern(MODEL_VERSION_PATTERN.pattern)

# --- requests ------------------------------------------------------------------------------------

TOKENS: Schema = {"type": "integer", "minimum": 1, "maximum": MAX_CONTEXT_LENGTH}


def _unsupported_fields() -> dict[str, Schema]:
    """Each refused feature's field, with the values that ask for nothing (accepted)."""
    return {
        name: {"enum": list(neutral), "description": f"{feature} is not supported"}
        for name, (feature, neutral) in UNSUPPORTED.items()
    }


#: Fields both generation endpoints take. Unknown fields are accepted and ignored, as OpenAI
#: clients send many (``user``, ``logit_bias``…).
GENERATION_FIELDS: dict[str, Schema] = {
    "model": {"type": "string", "minLength": 1, "description": "the id in /v1/models"},
    "max_tokens": nullable(TOKENS),
    "max_completion_tokens": nullable({**TOKENS, "description": "wins over max_tokens"}),
    "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "top_k": nullable({"type": "integer", "minimum": 0, "maximum": 2**31 - 1}),
    "seed": nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1}),
    "n": {"enum": [None, 1], "description": "only one choice per request"},
    "stop": {"anyOf": [STR, {"type": "array", "items": STR, "maxItems": MAX_STOP_SEQUENCES}, NULL]},
    "stream": BOOL,
    "stream_options": nullable(obj({"include_usage": BOOL}, required=[], closed=False)),
    "response_format": nullable(ref("ResponseFormat")),
    "grammar": nullable(GRAMMAR),
    "preset": nullable(
        {
            "type": "string",
            "pattern": f"^{PRESET_NAME_RE.pattern}$",
            "description": "one of the model's prompt presets (its presets in /v1/models)",
        }
    ),
    **_unsupported_fields(),
}
#: Ollama's field, which the two routes and the job worker take out of the body before they
#: parse it (a job's is checked when it is submitted).
KEEP_ALIVE: dict[str, Schema] = {
    "keep_alive": {
        "anyOf": [NUM, {"type": "string", "pattern": KEEP_ALIVE_PATTERN}],
        "description": (
            "how long the model stays loaded once this request ends: seconds, or a duration "
            '("250ms", "30s", "5m", "1h"); 0 unloads it then, a negative value keeps it until '
            "room is needed. Models loaded on demand only"
        ),
    }
}

TEXT_PART = obj({"type": {"const": "text"}, "text": STR}, closed=False)
MESSAGE: Schema = {
    **obj(
        {
            "role": {"enum": list(ROLES), "description": "developer is read as system"},
            "content": {"anyOf": [STR, {"type": "array", "items": TEXT_PART}, NULL]},
        },
        required=["role"],
        closed=False,
    ),
    "description": "an assistant message may carry the tool_calls it made; a tool message "
    "the tool_call_id it answers",
    "anyOf": [
        {"properties": {"role": {"enum": ["system", "user", "developer"]}}},
        {
            "properties": {
                "role": {"const": "assistant"},
                "tool_calls": nullable({"type": "array", "items": ref("ToolCall")}),
            }
        },
        {"properties": {"role": {"const": "tool"}, "tool_call_id": nullable(STR)}},
    ],
}
CHAT_FIELDS: dict[str, Schema] = {
    "messages": {"type": "array", "items": ref("ChatMessage"), "minItems": 1},
    "tools": nullable(ref("Tools")),
    "tool_choice": {
        "description": "see ToolChoice; without tools only auto or none (a request that names "
        "a preset may choose among the preset's tools)",
    },
    "parallel_tool_calls": {**BOOL, "description": "false: at most one call per reply"},
}
PROMPT: Schema = {"type": "string", "minLength": 1}
_NO_TOOLS: Schema = {"enum": [None, [], "none"], "description": "only a chat calls tools"}
COMPLETION_FIELDS: dict[str, Schema] = {
    "prompt": {
        "anyOf": [PROMPT, {"type": "array", "items": PROMPT, "minItems": 1, "maxItems": 1}],
        "description": "a string, or a list holding one string",
    },
    "tools": _NO_TOOLS,
    "tool_choice": _NO_TOOLS,
}


def generation_request(kind_fields: dict[str, Schema], rules: list[Schema]) -> Schema:
    """A chat or completion body, with the rules that relate its fields."""
    fields = {**GENERATION_FIELDS, **kind_fields, **KEEP_ALIVE}
    required = ["model", *(k for k in ("messages", "prompt") if k in kind_fields)]
    return {**obj(fields, required=required, closed=False), "allOf": rules}


CHAT_REQUEST = generation_request(CHAT_FIELDS, CHAT_RULES)
COMPLETION_REQUEST = generation_request(COMPLETION_FIELDS, [ONE_CONSTRAINT])

#: A job's request is not streamed: ``stream`` is absent or false.
_NOT_STREAMED: Schema = {"properties": {"stream": {"const": False}}}
JOB_REQUEST = obj(
    {
        "request": {
            "description": "a chat body (it has messages) or a completion body, not streamed",
            "anyOf": [
                {"allOf": [ref("ChatRequest"), _NOT_STREAMED]},
                {
                    "allOf": [ref("CompletionRequest"), _NOT_STREAMED],
                    "not": {"required": ["messages"]},
                },
            ],
        },
        "priority": {"type": "integer", "minimum": -100, "maximum": 100},
        "ttl_s": nullable({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TTL_S}),
        "deadline": nullable(
            {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": MAX_DEADLINE,
                "description": "a Unix time in the future; not with ttl_s",
            }
        ),
        "idempotency_key": nullable({"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS}),
        "metadata": nullable(
            {"type": "object", "description": f"at most {MAX_METADATA_BYTES} bytes of JSON"}
        ),
        "report": {"enum": ["local", "upstream"]},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 10},
        "wait_for_model": BOOL,
    },
    required=["request"],
    closed=False,
)
JOB_REQUEST["not"] = {
    "description": "ttl_s and deadline together",
    "properties": {"ttl_s": NUM, "deadline": NUM},
    "required": ["ttl_s", "deadline"],
}

MODEL_REF: Schema = {"type": "string", "minLength": 1, "description": "name@version, or a name"}
IMPORT_REQUEST = obj(
    {
        "path": {
            "type": "string",
            "pattern": "^/[^\\u0000]*$",
            "description": "absolute, on the device (no NUL: no file has one in its name)",
        },
        "name": nullable(MODEL_NAME),
        "version": nullable(MODEL_VERSION),
        "context_length": {
            "type": "integer",
            "minimum": MIN_CONTEXT_LENGTH,
            "maximum": MAX_CONTEXT_LENGTH,
        },
        "role": {"enum": ["generation", "embedding"], "default": "generation"},
        "presets": nullable(ref("Presets")),
    },
    required=["path"],
    closed=False,
)
INSTALL_REQUEST = obj(
    {"name": MODEL_NAME, "version": nullable(MODEL_VERSION)}, required=["name"], closed=False
)
ACTIVATE_REQUEST = obj({"model": MODEL_REF}, closed=False)
VERIFY_REQUEST = obj({"model": nullable(MODEL_REF)}, required=[], closed=False)
PIN_REQUEST = obj({"model": MODEL_REF, "pinned": BOOL}, required=["model"], closed=False)

# --- responses -----------------------------------------------------------------------------------

ERROR = obj(
    {
        "error": obj(
            {"message": STR, "type": STR, "param": nullable(STR), "code": nullable(STR)},
            closed=False,
        )
    }
)
USAGE = obj({"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT})
#: A chat reply that ended with whole tool calls says ``tool_calls``; a completion never does.
CHAT_FINISH: Schema = {"enum": ["stop", "length", "tool_calls"]}
TEXT_FINISH: Schema = {"enum": ["stop", "length"]}
INCOMPLETE = obj(
    {"reason": {"enum": ["max_tokens", "stop_sequence"]}, "message": STR},
    closed=False,
)
#: Only a reply held to a format (JSON, a grammar, the tool-call format) that ended before the
#: format did carries ``incomplete_details``: its text is cut off and does not parse.
_INCOMPLETE_FIELD = {"incomplete_details": {**INCOMPLETE, "description": "the reply is cut off"}}
CALL = obj(
    {"id": STR, "type": {"const": "function"}, "function": obj({"name": STR, "arguments": STR})}
)


def _completion(obj_name: str, choice: dict[str, Schema], finish: Schema) -> Schema:
    fields = {"index": INT, **choice, "logprobs": NULL, "finish_reason": finish}
    return obj(
        {
            "id": STR,
            "object": {"const": obj_name},
            "created": INT,
            "model": STR,
            "choices": {
                "type": "array",
                "items": obj({**fields, **_INCOMPLETE_FIELD}, required=list(fields)),
            },
            "usage": USAGE,
        }
    )


ASSISTANT_MESSAGE = obj(
    {
        "role": {"const": "assistant"},
        "content": {**nullable(STR), "description": "null when the reply is tool calls"},
        "tool_calls": {"type": "array", "items": CALL, "description": "the calls, in order"},
    },
    required=["role", "content"],
)
CHAT_COMPLETION = _completion("chat.completion", {"message": ASSISTANT_MESSAGE}, CHAT_FINISH)
TEXT_COMPLETION = _completion("text_completion", {"text": STR}, TEXT_FINISH)
#: One ``delta.tool_calls`` entry: the first of a call has its id and name, the rest carry
#: pieces of its arguments.
CALL_DELTA = obj(
    {
        "index": INT,
        "id": STR,
        "type": {"const": "function"},
        "function": obj({"name": STR, "arguments": STR}, required=["arguments"]),
    },
    required=["index", "function"],
)
CHAT_DELTA = obj(
    {
        "role": {"const": "assistant"},
        "content": nullable(STR),
        "tool_calls": {"type": "array", "items": CALL_DELTA},
    },
    required=[],
)


def _chunk(obj_name: str, choice: dict[str, Schema], finish: Schema) -> Schema:
    fields = {"index": INT, **choice, "logprobs": NULL, "finish_reason": nullable(finish)}
    return obj(
        {
            "id": STR,
            "object": {"const": obj_name},
            "created": INT,
            "model": STR,
            "choices": {
                "type": "array",
                "items": obj({**fields, **_INCOMPLETE_FIELD}, required=list(fields)),
                "description": "empty in the usage chunk",
            },
            "usage": {**USAGE, "description": "only in the last chunk, with include_usage"},
        },
        required=["id", "object", "created", "model", "choices"],
    )


CHAT_CHUNK = _chunk("chat.completion.chunk", {"delta": CHAT_DELTA}, CHAT_FINISH)
TEXT_CHUNK = _chunk("text_completion", {"text": STR}, TEXT_FINISH)


def event_stream(chunk: str) -> Schema:
    return {
        "type": "string",
        "description": (
            f"server-sent events: one {chunk} (#/components/schemas/{chunk}) per `data:` line, "
            "then `data: [DONE]`; a stream the runtime or a shutdown ends early has one Error "
            "event last instead, and no [DONE]"
        ),
    }


MODEL_CARD = obj(
    {
        "id": STR,
        "object": {"const": "model"},
        "created": INT,
        "owned_by": STR,
        "format": {"enum": ["gguf", "onnx"]},
        "backend": STR,
        "context_length": INT,
        "accelerator": FREE,
        "presets": {
            "type": "array",
            "items": obj({"name": STR, "description": STR}),
            "description": "the prompt presets signed with the model",
        },
        "version": STR,
        "role": {"enum": ["generation", "embedding"]},
        "dimensions": {**INT, "description": "an embedding model's vector length"},
        "loaded": {**BOOL, "description": "in memory now; a request loads a model that is not"},
        "active": {**BOOL, "description": "the device's active model, never unloaded"},
    },
    # A model not loaded yet has no backend or accelerator; an embedding model no presets.
    required=["id", "object", "created", "owned_by", "version", "role", "loaded", "active"],
)
MODEL_LIST = obj({"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}})
DECIMAL: Schema = {"anyOf": [NUM, STR], "description": "a number, or a decimal string"}
TARGET_FIELDS: dict[str, Schema] = {
    "path": STR,
    "length": INT,
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "name": STR,
    "version": STR,
    "format": {"enum": ["gguf", "onnx"]},
    "backend": STR,
    "context_length": INT,
    "chat_template": nullable(STR),
    "quantization": STR,
    "min_ram_bytes": INT,
    "sampling": obj({"temperature": DECIMAL, "top_p": DECIMAL, "top_k": INT}),
    "health_check": obj(
        {"prompt": STR, "max_tokens": INT, "timeout_s": DECIMAL, "min_tokens_per_s": DECIMAL}
    ),
}
#: Only an embedding model's target says its role; absent, it is a generation model.
TARGET_REQUIRED = sorted(TARGET_FIELDS)
TARGET_FIELDS["role"] = {"enum": ["generation", "embedding"], "default": "generation"}
#: Only a target with prompt presets lists them (edgelm_protocol.presets has their schema).
TARGET_FIELDS["presets"] = FREE
TARGET = obj(TARGET_FIELDS, required=TARGET_REQUIRED)
INSTALLED_MODEL = obj(
    {**TARGET_FIELDS, "ref": STR, "active": BOOL, "previous": BOOL, "pinned": BOOL},
    required=[*TARGET_REQUIRED, "active", "pinned", "previous", "ref"],
)
HISTORY_ENTRY = obj(
    {
        "at": STR,
        "event": STR,
        "model": STR,
        "reason": nullable(STR),
        "seq": INT,
        "details": nullable(FREE),
    }
)
REGISTRY_STATE = obj(
    {
        "active": nullable(STR),
        "previous": nullable(STR),
        "pinned": {"type": "array", "items": STR},
        "models": {"type": "array", "items": ref("InstalledModel")},
        "history": {"type": "array", "items": HISTORY_ENTRY},
    }
)
AVAILABLE = obj({"models": {"type": "array", "items": ref("Target")}})
VERIFIED = obj(
    {
        "ok": BOOL,
        "results": {
            "type": "array",
            "items": obj({"ref": STR, "ok": BOOL, "error": nullable(STR)}),
        },
    }
)
COLLECTED = obj({"removed": {"type": "array", "items": STR}, "freed_bytes": INT})
PINNED = obj({**TARGET_FIELDS, "pinned": BOOL}, required=[*TARGET_REQUIRED, "pinned"])
JOB_ERROR = obj({"code": STR, "type": STR, "message": STR}, required=["code", "message"])
_JOB_COMMON: dict[str, Schema] = {
    "id": STR,
    "object": {"const": "job"},
    "state": {"enum": [str(s) for s in JobState]},
    "kind": {"enum": ["chat", "completion"]},
    "priority": INT,
    "idempotency_key": nullable(STR),
    "metadata": nullable(FREE),
    "report": {"enum": ["local", "upstream"]},
    "attempts": INT,
    "max_attempts": INT,
    "created_at": UNIX_TIME,
    "updated_at": UNIX_TIME,
    "started_at": nullable(UNIX_TIME),
    "finished_at": nullable(UNIX_TIME),
    "deadline": nullable(UNIX_TIME),
    "error": nullable(JOB_ERROR),
}
JOB = obj(
    {
        **_JOB_COMMON,
        "request": FREE,
        "result": nullable(FREE),
        "position": nullable({**INT, "description": "waiting jobs ahead of this one"}),
    }
)
JOB_SUMMARY = obj({**_JOB_COMMON, "model": STR})
JOB_LIST = obj(
    {
        "object": {"const": "list"},
        "data": {"type": "array", "items": ref("JobSummary")},
        "next_cursor": nullable(STR),
    }
)
OUTBOX: Schema = {"type": "object", "additionalProperties": INT}
SYNC = obj(
    {
        "enrolled": BOOL,
        "fleet": STR,
        "device": STR,
        "broker": obj({"url": STR, "connected": BOOL}, closed=False),
        "desired": FREE,
        "outbox": OUTBOX,
    },
    required=["enrolled"],
)
STATUS = obj({"status": STR}, closed=False)
READINESS = obj(
    {
        "status": {"enum": ["ready", "loading", "no_model", "degraded", "draining"]},
        "model": STR,
        "queue_depth": INT,
        "busy": BOOL,
        "message": STR,
        "consecutive_failures": INT,
        "failing_services": {"type": "array", "items": STR},
        "services": FREE,
        "sync": FREE,
    },
    required=["status"],
)

TOKEN_ARRAY: Schema = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "description": "in the model's vocabulary"},
    "minItems": 1,
}
EMBEDDING_REQUEST = obj(
    {
        "model": NON_EMPTY,
        "input": {
            "anyOf": [
                NON_EMPTY,
                {"type": "array", "items": NON_EMPTY, "minItems": 1, "maxItems": MAX_INPUTS},
                {**TOKEN_ARRAY, "maxItems": MAX_INPUTS},
                {"type": "array", "items": TOKEN_ARRAY, "minItems": 1, "maxItems": MAX_INPUTS},
            ],
            "description": "texts or token arrays; each input at most the model's context",
        },
        "encoding_format": {"enum": ["float", "base64", None], "default": "float"},
        "dimensions": nullable(
            {"type": "integer", "minimum": 1, "description": "the model's own only"}
        ),
    },
    required=["model", "input"],
    closed=False,
)
EMBEDDING_REQUEST["description"] = "other fields (OpenAI's user…) are accepted and ignored"
EMBEDDING_LIST = obj(
    {
        "object": {"const": "list"},
        "model": STR,
        "data": {
            "type": "array",
            "items": obj(
                {
                    "object": {"const": "embedding"},
                    "index": INT,
                    "embedding": {
                        "anyOf": [{"type": "array", "items": NUM}, STR],
                        "description": "unit length; base64: float32, little-endian",
                    },
                }
            ),
        },
        "usage": obj({"prompt_tokens": INT, "total_tokens": INT}),
    }
)

COMPONENTS: dict[str, Schema] = {
    "Error": ERROR,
    "ChatMessage": MESSAGE,
    "ChatRequest": CHAT_REQUEST,
    "CompletionRequest": COMPLETION_REQUEST,
    "ChatCompletion": CHAT_COMPLETION,
    "TextCompletion": TEXT_COMPLETION,
    "ChatCompletionChunk": CHAT_CHUNK,
    "TextCompletionChunk": TEXT_CHUNK,
    "Model": MODEL_CARD,
    "ModelList": MODEL_LIST,
    "EmbeddingRequest": EMBEDDING_REQUEST,
    "EmbeddingList": EMBEDDING_LIST,
    "JobRequest": JOB_REQUEST,
    "Job": JOB,
    "JobSummary": JOB_SUMMARY,
    "JobList": JOB_LIST,
    "ImportRequest": IMPORT_REQUEST,
    "InstallRequest": INSTALL_REQUEST,
    "ActivateRequest": ACTIVATE_REQUEST,
    "VerifyRequest": VERIFY_REQUEST,
    "PinRequest": PIN_REQUEST,
    "Target": TARGET,
    "InstalledModel": INSTALLED_MODEL,
    "RegistryState": REGISTRY_STATE,
    "Available": AVAILABLE,
    "Verified": VERIFIED,
    "Collected": COLLECTED,
    "Pinned": PINNED,
    "Sync": SYNC,
    "Status": STATUS,
    "Readiness": READINESS,
    **OUTPUT_COMPONENTS,
}
