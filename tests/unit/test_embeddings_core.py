"""The pure parts of embeddings: the request, the batches, the wire format, the model role."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.errors import InvalidRequest
from edgelm_agent.generation.embeddings import (
    MAX_INPUTS,
    SHOWN_INDEXES,
    InputTooLong,
    NonFiniteVector,
    check_dimensions,
    check_finite,
    check_tokens,
    embeddings_response,
    encode,
    normalized,
    parse_embeddings,
    plan_batches,
)
from edgelm_protocol.errors import InvalidModelMetadata
from edgelm_protocol.targets import (
    EMBEDDING,
    GENERATION,
    model_target_from_dict,
    parse_model_target,
)
from edgelm_provisioning.model_source import prepare_model
from edgelm_provisioning.targets_signing import ModelSettings, new_target
from tests.agent_process import FIXTURES

SHA = "a" * 64


def refused(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_embeddings(body)
    return caught.value


class TestParse:
    def test_a_string_is_one_text(self):
        """``input`` as a string is one text, float encoding by default."""
        body = parse_embeddings({"model": "m", "input": "hello"})
        assert (body.texts, body.token_inputs, body.encoding_format) == (("hello",), (), "float")

    def test_a_list_of_strings_keeps_its_order(self):
        """A list of strings is one text each, in order."""
        assert parse_embeddings({"model": "m", "input": ["a", "b"]}).texts == ("a", "b")

    def test_token_arrays_are_inputs_of_their_own(self):
        """A list of integers is one token array; a list of such lists, several."""
        assert parse_embeddings({"model": "m", "input": [1, 2]}).token_inputs == ((1, 2),)
        body = parse_embeddings({"model": "m", "input": [[1], [2, 3]]})
        assert body.token_inputs == ((1,), (2, 3))
        assert body.count == 2

    @pytest.mark.parametrize(
        ("value", "says"),
        [
            ([], "empty list"),
            ("", "empty string"),
            (["a", ""], "input[1] is an empty string"),
            (["a", 1], "input[1] must be a string"),
            ([True], "input[0] must be a string"),
            ([[1], "a"], "input[1] must be a token array"),
            ([[1], []], "input[1] is an empty token array"),
            ({"a": 1}, "got dict"),
            (["x"] * (MAX_INPUTS + 1), f"at most {MAX_INPUTS}"),
        ],
    )
    def test_bad_inputs_are_400s_that_say_what_is_wrong(self, value, says):
        """Every malformed ``input`` is refused with a message naming the problem."""
        error = refused({"model": "m", "input": value})
        assert says in str(error)
        assert error.param == "input"

    def test_the_other_fields_are_checked(self):
        """A missing model or input, a bad encoding or dimensions name their field."""
        assert refused({"input": "x"}).param == "model"
        assert refused({"model": "m"}).param == "input"
        assert refused({"model": "m", "input": "x", "encoding_format": "hex"}).param == (
            "encoding_format"
        )
        assert refused({"model": "m", "input": "x", "dimensions": 0}).param == "dimensions"
        assert refused({"model": "m", "input": "x", "dimensions": True}).param == "dimensions"

    def test_dimensions_must_be_the_models_own(self):
        """The model's own length is accepted; any other is a 400 that says its length."""
        check_dimensions(None, "m", 384)
        check_dimensions(384, "m", 384)
        with pytest.raises(InvalidRequest, match="returns 384-dimensional vectors"):
            check_dimensions(256, "m", 384)


class TestTokens:
    def test_an_input_over_the_limit_names_index_length_and_limit(self):
        """Too long is refused, not cut."""
        with pytest.raises(InputTooLong) as caught:
            check_tokens([[1, 2], [1, 2, 3, 4]], limit_tokens=3, vocab_size=10, model="m")
        assert (caught.value.index, caught.value.tokens, caught.value.limit_tokens) == (1, 4, 3)
        assert caught.value.code == "context_length_exceeded"

    def test_token_ids_outside_the_vocabulary_are_refused(self):
        """Negative ids and ids past the vocabulary never reach the runtime."""
        for bad in (-1, 10):
            with pytest.raises(InvalidRequest, match=f"token id {bad}"):
                check_tokens([[1, bad]], limit_tokens=8, vocab_size=10, model="m")


class TestBatches:
    @given(
        lengths=st.lists(st.integers(1, 16), max_size=60),
        max_tokens=st.integers(16, 64),
        max_inputs=st.integers(1, 8),
    )
    def test_batches_cover_every_input_once_within_both_limits(
        self, lengths, max_tokens, max_inputs
    ):
        """Batches are consecutive, cover all inputs in order, and respect both limits."""
        batches = plan_batches(lengths, max_tokens=max_tokens, max_inputs=max_inputs)
        assert [i for b in batches for i in b] == list(range(len(lengths)))
        for batch in batches:
            assert 1 <= len(batch) <= max_inputs
            assert sum(lengths[i] for i in batch) <= max_tokens


class TestWireFormat:
    @given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64))
    def test_base64_and_float_carry_the_same_float32_values(self, vector):
        """Decoding the base64 form gives exactly the float32 values the float form holds."""
        as_base64 = encode(vector, "base64")
        as_float = encode(vector, "float")
        assert isinstance(as_base64, str)
        assert isinstance(as_float, list)
        raw = base64.b64decode(as_base64)
        decoded = struct.unpack(f"<{len(vector)}f", raw)
        assert list(decoded) == list(struct.unpack(f"<{len(vector)}f", struct.pack(
            f"<{len(vector)}f", *as_float
        )))  # fmt: skip
        assert list(decoded) == [struct.unpack("<f", struct.pack("<f", v))[0] for v in vector]

    def test_vectors_are_scaled_to_unit_length(self):
        """A dot product of two answers is their cosine similarity; zero stays zero."""
        assert normalized([3.0, 4.0]) == [0.6, 0.8]
        assert normalized([0.0, 0.0]) == [0.0, 0.0]
        assert math.isclose(math.hypot(*normalized([1e-30, 2e-30])), 1.0)

    def test_the_response_is_openais_shape(self):
        """A list of embeddings in input order, the model, and the tokens used."""
        body = embeddings_response("m", [[1.0], [0.5]], "float", 7)
        assert body == {
            "object": "list",
            "data": [
                {"object": "embedding", "index": 0, "embedding": [1.0]},
                {"object": "embedding", "index": 1, "embedding": [0.5]},
            ],
            "model": "m",
            "usage": {"prompt_tokens": 7, "total_tokens": 7},
        }


def custom(**fields: Any) -> dict[str, Any]:
    base = {
        "name": "m",
        "version": "1",
        "format": "gguf",
        "backend": "llama.cpp",
        "context_length": 512,
        "quantization": "F16",
        "min_ram_bytes": 0,
    }
    return {"edgelm": {**base, **fields}}


class TestNonFinite:
    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
    def test_a_non_finite_value_is_a_500_naming_the_model_and_the_inputs(self, bad):
        """NaN and infinities are refused with the model and every input they are in."""
        vectors = [[0.5, 0.5], [0.1, bad], [1.0, 0.0], [bad, bad]]
        with pytest.raises(NonFiniteVector) as caught:
            check_finite(vectors, model="embed")
        assert caught.value.indexes == (1, 3)
        assert caught.value.code == "backend_error"
        assert "model 'embed'" in str(caught.value)
        assert "input[1], input[3];" in str(caught.value)

    def test_many_broken_inputs_are_counted_not_all_named(self):
        """A message names the first few broken inputs and counts the rest."""
        with pytest.raises(NonFiniteVector) as caught:
            check_finite([[math.nan]] * (SHOWN_INDEXES + 5), model="embed")
        assert f"input[{SHOWN_INDEXES - 1}] and 5 more;" in str(caught.value)
        assert f"input[{SHOWN_INDEXES}]" not in str(caught.value)

    def test_finite_vectors_pass(self):
        """Ordinary vectors, the zero vector included, are accepted."""
        check_finite([[0.0, 0.0], [-1.0, 3.4e38]], model="embed")

    @pytest.mark.parametrize("encoding", ["float", "base64"])
    @pytest.mark.parametrize("bad", [math.nan, math.inf, 1e39])
    def test_the_wire_format_never_writes_a_non_finite_value(self, encoding, bad):
        """encode() refuses what JSON cannot carry, or what float32 turns into infinity."""
        with pytest.raises(ValueError, match="NaN or an infinity"):
            encode([0.0, bad], encoding)


class TestRole:
    def test_metadata_without_a_role_is_a_generation_model(self):
        """Targets signed before roles existed stay valid, as generation models, and sign
        to the same custom object as before (no role key)."""
        target = parse_model_target("models/m/1/model.gguf", 1, {"sha256": SHA}, custom())
        assert target.role == GENERATION
        assert "role" not in target.custom()

    def test_an_embedding_role_round_trips(self):
        """``role: embedding`` is parsed, written back, and read back from a record."""
        target = parse_model_target(
            "models/m/1/model.gguf", 1, {"sha256": SHA}, custom(role="embedding")
        )
        assert target.role == EMBEDDING
        assert target.custom()["role"] == "embedding"
        assert model_target_from_dict(target.as_dict()) == target

    @pytest.mark.parametrize("role", ["chat", 1, None, ["embedding"]])
    def test_an_unknown_role_is_refused_naming_it(self, role):
        """Only generation and embedding exist."""
        with pytest.raises(InvalidModelMetadata, match="must be generation or embedding"):
            parse_model_target("models/m/1/model.gguf", 1, {"sha256": SHA}, custom(role=role))

    def test_an_onnx_embedding_model_is_refused(self):
        """Embeddings are served by llama.cpp: an ONNX embedding target is refused."""
        with pytest.raises(InvalidModelMetadata, match="must be GGUF"):
            parse_model_target(
                "models/m/1/bundle.json",
                1,
                {"sha256": SHA},
                custom(format="onnx", backend="onnxruntime-genai", role="embedding"),
            )

    def test_fleet_push_signs_the_role(self):
        """``edgelm fleet models push --role embedding`` signs a target the agent reads as
        an embedding model; a generation push signs no role key, as before roles."""
        prepared = prepare_model(FIXTURES / "tiny-embed.gguf")
        embedding = new_target(prepared, ModelSettings("tiny-embed", "1", role=EMBEDDING))
        assert embedding.model.role == EMBEDDING
        assert embedding.info.unrecognized_fields["custom"]["edgelm"]["role"] == "embedding"
        generation = new_target(prepared, ModelSettings("tiny-embed", "2"))
        assert "role" not in generation.info.unrecognized_fields["custom"]["edgelm"]
