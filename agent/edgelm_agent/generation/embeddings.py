"""``POST /v1/embeddings``, without I/O: the request checked, the inputs fitted to the model,
batches planned, and the vectors written back the way OpenAI's API writes them.

Choices, and why:

* **Too long is a 400, not a cut.** An input over the model's limit is refused with its index,
  its token count and the limit. Truncating (``llama-cpp-python``'s default) would index a
  manual page by its first paragraph without anyone knowing; chunking would answer one input
  with several vectors. The client splits its text, and knows it did.
* **Vectors are unit length** (L2-normalized), as OpenAI's are, so a dot product is the cosine
  similarity. Sentence-transformers models normalize too; llama.cpp does not by itself.
* **``base64``** is the vector's float32 values, little-endian, as the ``openai`` client (which
  asks for base64 by default) decodes them. The ``float`` form carries the same float32 values,
  written with the 9 significant digits that identify a float32 exactly.
* **A NaN or an infinity is a 500**, never a number on the wire: JSON has no such value (the
  body would not parse), base64 would carry it silently into a search index, and a vector
  with one has no direction to compare. The error names the model and the input.
* **``dimensions``** cannot shorten a vector (only models trained for it, Matryoshka-style, may
  be cut, and GGUF does not say which are): it is accepted when it equals the model's own
  length, and refused otherwise with that length in the message.
"""

from __future__ import annotations

import array
import base64
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from edgelm_agent.errors import BackendError, InvalidRequest, RequestError, shown

EncodingFormat = Literal["float", "base64"]

#: Inputs one request may carry: OpenAI's own limit. The body limit (max_body_bytes) and the
#: per-input token limit bound the rest of the work.
MAX_INPUTS = 2048
ENCODINGS: tuple[EncodingFormat, ...] = ("float", "base64")
#: Inputs a :class:`NonFiniteVector` message names before it says how many more there are.
SHOWN_INDEXES = 8


class InputTooLong(RequestError):
    """One input has more tokens than the model embeds at once."""

    code = "context_length_exceeded"

    def __init__(self, *, index: int, tokens: int, limit_tokens: int, model: str) -> None:
        super().__init__(
            f"input[{index}] is {tokens} tokens; model {model!r} embeds at most "
            f"{limit_tokens} tokens per input. Split the text into shorter pieces (each gets "
            "its own vector); nothing is truncated",
            param="input",
        )
        self.index = index
        self.tokens = tokens
        self.limit_tokens = limit_tokens


class NonFiniteVector(BackendError):
    """The model returned vectors holding a NaN or an infinity: a runtime fault (broken
    weights, an overflow), answered with a 500 that names the model and the inputs."""

    def __init__(self, *, model: str, indexes: Sequence[int]) -> None:
        named = ", ".join(f"input[{i}]" for i in indexes[:SHOWN_INDEXES])
        more = f" and {len(indexes) - SHOWN_INDEXES} more" if len(indexes) > SHOWN_INDEXES else ""
        super().__init__(
            f"model {model!r} returned a vector with a non-finite value (NaN or infinity) for "
            f"{named}{more}; no vectors are returned for this request. The model's weights or "
            "its runtime are broken for such input"
        )
        self.model = model
        #: The inputs whose vectors are not finite, in order.
        self.indexes = tuple(indexes)


@dataclass(frozen=True)
class EmbeddingBody:
    """A checked request: its inputs are texts or token arrays, never both."""

    model: str
    texts: tuple[str, ...]
    token_inputs: tuple[tuple[int, ...], ...]
    encoding_format: EncodingFormat
    dimensions: int | None

    @property
    def count(self) -> int:
        return len(self.texts) or len(self.token_inputs)


def parse_embeddings(data: dict[str, Any]) -> EmbeddingBody:
    """Check an embeddings request body; a 400 naming the field for anything wrong.

    ``input`` is a string, a list of strings, a token array (a list of integers), or a list of
    token arrays, as in OpenAI's API. Every text and array must be non-empty.
    """
    model = data.get("model")
    if "model" not in data:
        raise InvalidRequest("missing required field 'model'", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            f"'model' must be a non-empty string, got {shown(model)}", param="model"
        )
    if "input" not in data:
        raise InvalidRequest("missing required field 'input'", param="input")
    texts, token_inputs = _inputs(data["input"])
    encoding = data.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise InvalidRequest(
            f"'encoding_format' must be float or base64, got {shown(encoding)}",
            param="encoding_format",
        )
    dimensions = data.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise InvalidRequest(
            f"'dimensions' must be a positive integer, got {shown(dimensions)}",
            param="dimensions",
        )
    return EmbeddingBody(model, texts, token_inputs, encoding, dimensions)


def _inputs(value: Any) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """(texts, token arrays): exactly one of them is non-empty."""
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'input' is an empty string; send text to embed", param="input")
        return (value,), ()
    if not isinstance(value, list):
        raise InvalidRequest(
            "'input' must be a string, a list of strings, a token array (a list of "
            f"integers) or a list of token arrays, got {type(value).__name__}",
            param="input",
        )
    if not value:
        raise InvalidRequest("'input' is an empty list; send at least one text", param="input")
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(
            f"'input' has {len(value)} items; at most {MAX_INPUTS} are embedded per request",
            param="input",
        )
    if all(_is_token(v) for v in value):
        return (), (tuple(value),)
    if isinstance(value[0], list):
        return (), tuple(_token_array(item, i) for i, item in enumerate(value))
    texts = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidRequest(
                f"input[{i}] must be a string (a list holds strings only, or token arrays "
                f"only), got {type(item).__name__} {shown(item)}",
                param="input",
            )
        if not item:
            raise InvalidRequest(
                f"input[{i}] is an empty string; send text to embed", param="input"
            )
        texts.append(item)
    return tuple(texts), ()


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_array(item: Any, index: int) -> tuple[int, ...]:
    if not isinstance(item, list) or not all(_is_token(t) for t in item):
        raise InvalidRequest(
            f"input[{index}] must be a token array, a list of integers (a list holds "
            f"strings only, or token arrays only), got {shown(item)}",
            param="input",
        )
    if not item:
        raise InvalidRequest(f"input[{index}] is an empty token array", param="input")
    return tuple(item)


def check_dimensions(requested: int | None, model: str, dimensions: int) -> None:
    if requested is not None and requested != dimensions:
        raise InvalidRequest(
            f"'dimensions' {requested} is not supported: model {model!r} returns "
            f"{dimensions}-dimensional vectors and cannot shorten them; omit 'dimensions' or "
            f"set it to {dimensions}",
            param="dimensions",
        )


def check_tokens(
    inputs: Sequence[Sequence[int]], *, limit_tokens: int, vocab_size: int, model: str
) -> None:
    """Every input fits the model, and every token id of a client's array is in its
    vocabulary (llama.cpp reads out of bounds on an id past it)."""
    for index, tokens in enumerate(inputs):
        if len(tokens) > limit_tokens:
            raise InputTooLong(
                index=index, tokens=len(tokens), limit_tokens=limit_tokens, model=model
            )
        bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"input[{index}] holds token id {shown(bad)}; model {model!r} has ids 0 to "
                f"{vocab_size - 1}",
                param="input",
            )


def plan_batches(lengths: Sequence[int], *, max_tokens: int, max_inputs: int) -> list[range]:
    """Consecutive inputs grouped into decode batches of at most ``max_tokens`` tokens and
    ``max_inputs`` inputs each (every length is at most ``max_tokens``)."""
    batches: list[range] = []
    start, tokens = 0, 0
    for i, length in enumerate(lengths):
        if i > start and (tokens + length > max_tokens or i - start >= max_inputs):
            batches.append(range(start, i))
            start, tokens = i, 0
        tokens += length
    if lengths:
        batches.append(range(start, len(lengths)))
    return batches


def is_finite(vector: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in vector)


def check_finite(vectors: Sequence[Sequence[float]], *, model: str) -> None:
    """Every value of every vector is a finite number; :class:`NonFiniteVector` naming the
    inputs whose vectors are not, otherwise."""
    bad = [index for index, vector in enumerate(vectors) if not is_finite(vector)]
    if bad:
        raise NonFiniteVector(model=model, indexes=bad)


def normalized(vector: Sequence[float]) -> list[float]:
    """``vector`` scaled to unit length; a zero vector stays zero (it has no direction)."""
    norm = math.sqrt(math.fsum(v * v for v in vector))
    if norm == 0.0 or not math.isfinite(norm):
        return list(vector)
    return [v / norm for v in vector]


def encode(vector: Sequence[float], encoding: EncodingFormat) -> list[float] | str:
    """The vector as it goes on the wire: float32 values, as numbers or as base64. A value
    that is not a finite float32 is a fault of the caller, which checks first
    (:func:`check_finite`): this never writes one."""
    values = array.array("f", vector)
    if not is_finite(values):
        raise ValueError("a vector with a NaN or an infinity cannot be written")
    if encoding == "float":
        return [float(f"{v:.9g}") for v in values]
    if sys.byteorder == "big":  # the wire format is little-endian
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def embeddings_response(
    model: str, vectors: Sequence[Sequence[float]], encoding: EncodingFormat, prompt_tokens: int
) -> dict[str, Any]:
    """OpenAI's response body for ``vectors``, in input order."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(vector, encoding)}
            for i, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
