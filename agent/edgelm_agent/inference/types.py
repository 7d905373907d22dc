"""Value objects that cross the boundary between the API, the scheduler and the backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgelm_protocol.targets import MIN_CONTEXT_LENGTH as _SCHEMA_MIN_CONTEXT_LENGTH

FinishReason = Literal["stop", "length", "cancelled"]

#: Below this a model cannot hold its health check: the signed schema's minimum (see
#: edgelm_protocol.targets), which the agent's configuration enforces as well.
MIN_CONTEXT_LENGTH = _SCHEMA_MIN_CONTEXT_LENGTH
#: Above this a context length is a mistake (or an attack on memory), not a model: 2^20
#: tokens is beyond what any model the agent serves is trained for.
MAX_CONTEXT_LENGTH = 1 << 20
Format = Literal["gguf", "onnx"]


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a sampling field out gets; a model's metadata may set them."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40


@dataclass(frozen=True)
class OutputConstraint:
    """What the output must match, in the forms the runtimes take; the backend applies it to
    every token as it is picked, so the output cannot leave it (it can only stop early).

    ``gbnf`` is for llama.cpp's grammar sampler. ``guidance`` is for llguidance in
    onnxruntime-genai, as its (type, data) pair (``json_schema`` or ``lark_grammar``); None when
    the constraint has no such form (a client's GBNF grammar), and then that runtime refuses it.
    """

    kind: Literal["json_object", "json_schema", "grammar", "tool_calls"]
    gbnf: str
    guidance: tuple[str, str] | None = None
    #: What the output is held to, for messages: "the JSON schema 'person'".
    description: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy decoding."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    constraint: OutputConstraint | None = None


@dataclass(frozen=True)
class SamplingFields:
    """Sampling fields as a client sent them; ``None`` means use the model's default."""

    max_tokens: int | None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Acceleration:
    """Where the runtime runs the model; ``/v1/models`` and the ``model_loaded`` log say it."""

    #: llama.cpp: whether this build of the library can offload layers to a GPU at all.
    gpu_offload: bool = False
    #: llama.cpp: layers given to the GPU (-1: all of them); 0 on the CPU.
    gpu_layers: int | None = None
    #: onnxruntime-genai: the execution provider (``cpu``, ``cuda``).
    execution_provider: str | None = None

    def as_dict(self) -> dict[str, object]:
        facts: dict[str, object] = {"gpu_offload": self.gpu_offload}
        if self.gpu_layers is not None:
            facts["gpu_layers"] = self.gpu_layers
        if self.execution_provider is not None:
            facts["execution_provider"] = self.execution_provider
        return facts


@dataclass(frozen=True)
class ModelInfo:
    """What the API needs to know about the loaded model."""

    model_id: str
    path: str
    format: Format
    backend: str
    context_length: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    created: int = 0  # unix time the model was loaded; /v1/models reports it
    #: Every text the tokenizer reads as one special token (control, user-defined, added).
    special_texts: frozenset[str] = frozenset()
    accelerator: Acceleration = Acceleration()


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized prompt ready to run. ``prompt_tokens`` already fits the context."""

    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    request_id: str = ""


@dataclass(frozen=True)
class TextDelta:
    """New text, valid UTF-8, possibly covering several tokens."""

    text: str
    tokens: int


@dataclass(frozen=True)
class Finished:
    """The last event of every generation."""

    reason: FinishReason
    completion_tokens: int
    prefill_s: float  # from the start of the run to the first token (or to the end if none)
    decode_s: float  # from the first token to the last

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed; undefined below two tokens, where there is no interval to measure."""
        if self.completion_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.completion_tokens - 1) / self.decode_s


GenerationEvent = TextDelta | Finished
