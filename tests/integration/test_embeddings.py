"""``POST /v1/embeddings`` through the official ``openai`` client, against real agents.

The agents serve tiny-llama as their chat model and ``tests/fixtures/tiny-embed.gguf`` (a tiny
random BERT, made by the same converter as the real model) as their embedding model. The test
of meaning runs on all-MiniLM-L6-v2 when ``scripts/fetch_embedding_model.py`` has fetched it
(``make embedding-model``), and is skipped otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import openai
import pytest
from gguf import GGUFReader
from openai import Omit, OpenAI, omit

from tests.agent_process import FIXTURES, REPO, TINY_GGUF, AgentProcess

pytestmark = pytest.mark.llama

TINY_EMBED = FIXTURES / "tiny-embed.gguf"
MINILM = REPO / "models" / "all-MiniLM-L6-v2-F16.gguf"


def gguf_facts(path: Path) -> tuple[int, list[str]]:
    """(n_embd, token list) as the GGUF file itself says, not as the agent reports them."""
    reader = GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_embd = int(reader.fields[f"{arch}.embedding_length"].parts[-1][0])
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    return n_embd, tokens


def start(workdir: Path, embedding_model: str, *, model: Path | None = TINY_GGUF) -> AgentProcess:
    return AgentProcess(
        workdir, model=model, extra_args=["--embedding-model", embedding_model]
    ).wait_ready()


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    """One agent for the module: tiny-llama chats, tiny-embed embeds."""
    workdir = Path(tempfile.mkdtemp(prefix="edgelm-", dir="/tmp"))
    served = start(workdir, str(TINY_EMBED))
    yield served
    served.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def client(agent: AgentProcess) -> OpenAI:
    return OpenAI(base_url=agent.base_url + "/v1", api_key="unused", max_retries=0)


def vectors(
    client: OpenAI,
    inputs: str | list[str] | list[list[int]],
    encoding_format: Literal["float", "base64"] | Omit = omit,
    dimensions: int | Omit = omit,
) -> npt.NDArray[np.float32]:
    """The vectors the client hands back, one row per input, checked to be in order."""
    response = client.embeddings.create(
        model="tiny-embed", input=inputs, encoding_format=encoding_format, dimensions=dimensions
    )
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


class TestEmbeddings:
    def test_a_string_gets_one_unit_vector_of_the_models_width(self, client):
        """One text, one vector as long as the model's n_embd, scaled to unit length."""
        n_embd, _ = gguf_facts(TINY_EMBED)
        response = client.embeddings.create(model="tiny-embed", input="hello world")
        assert response.model == "tiny-embed"
        assert len(response.data) == 1
        vector = np.array(response.data[0].embedding)
        assert vector.shape == (n_embd,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        assert response.usage.prompt_tokens == response.usage.total_tokens > 2

    def test_a_list_gets_one_vector_per_text_in_order(self, client):
        """Each text of a list gets its own vector, in the list's order, each the one it
        gets alone: the texts of a batch do not leak into each other."""
        texts = ["the dog", "a cat on the machine", "search the manual", "hello"]
        together = vectors(client, texts, encoding_format="float")
        alone = np.array([vectors(client, t, encoding_format="float")[0] for t in texts])
        assert together.shape[0] == len(texts)
        np.testing.assert_allclose(together, alone, atol=1e-5)
        assert len({tuple(np.round(v, 4)) for v in together}) == len(texts)

    def test_base64_decodes_to_the_float_vector(self, agent):
        """``encoding_format: base64`` (the openai client's default) is the float form's
        float32 values, little-endian."""
        body = {"model": "tiny-embed", "input": ["factory kiosk", "hello"]}
        status, floats = agent.request("POST", "/v1/embeddings", body)
        assert status == 200
        status, encoded = agent.request(
            "POST", "/v1/embeddings", {**body, "encoding_format": "base64"}
        )
        assert status == 200
        for as_float, as_base64 in zip(floats["data"], encoded["data"], strict=True):
            decoded = np.frombuffer(base64.b64decode(as_base64["embedding"]), dtype="<f4")
            np.testing.assert_array_equal(decoded, np.array(as_float["embedding"], "<f4"))

    def test_the_openai_client_default_decodes_to_the_same_vector(self, client):
        """The client asks for base64 unless told otherwise and decodes it itself; it gets
        the vector the float form carries."""
        default = vectors(client, "hello world")
        as_float = vectors(client, "hello world", encoding_format="float")
        np.testing.assert_array_equal(default, as_float)

    def test_vectors_are_deterministic(self, client):
        """The same request gives the same vectors, bit for bit, request after request; the
        same text in another batch differs at most by float32 rounding."""
        texts = ["question and answer", "the market fell today"]
        first = vectors(client, texts, encoding_format="float")
        np.testing.assert_array_equal(first, vectors(client, texts, encoding_format="float"))
        np.testing.assert_array_equal(first, vectors(client, texts, encoding_format="float"))
        alone = vectors(client, texts[0], encoding_format="float")
        np.testing.assert_allclose(first[:1], alone, atol=1e-6)

    def test_a_token_array_is_embedded_as_given(self, client):
        """A token array (with the model's own [CLS] and [SEP]) gets the vector of the text
        those tokens spell."""
        _, tokens = gguf_facts(TINY_EMBED)
        ids = [tokens.index("[CLS]"), tokens.index("\u2581hello"), tokens.index("[SEP]")]
        np.testing.assert_allclose(
            vectors(client, [ids], encoding_format="float"),
            vectors(client, "hello", encoding_format="float"),
            atol=1e-6,
        )

    def test_dimensions_equal_to_the_models_width_is_accepted(self, client):
        """Asking for the length the model has is no change, so it is served."""
        n_embd, _ = gguf_facts(TINY_EMBED)
        assert vectors(client, "hello", dimensions=n_embd).shape == (1, n_embd)

    def test_answers_carry_the_models_provenance(self, agent):
        """Which model and which signed bytes answered, as on chat responses."""
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
        try:
            body = json.dumps({"model": "tiny-embed", "input": "hello"})
            conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            headers = response.headers
        finally:
            conn.close()
        assert response.status == 200
        digest = "sha256:" + sha256_of(TINY_EMBED)
        assert headers["X-Edgelm-Model"] == f"tiny-embed@sha256-{digest[7:19]}"
        assert headers["X-Edgelm-Model-Digest"] == digest


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bad_request(client: OpenAI, **body: Any) -> openai.BadRequestError:
    """The 400 the client raises for this request."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(**body)
    return caught.value


class TestBadInput:
    def test_an_empty_list_is_refused(self, client):
        """An empty list is a 400 that says it is empty."""
        error = bad_request(client, model="tiny-embed", input=[])
        assert "empty list" in error.message

    def test_an_empty_string_is_refused(self, client):
        """An empty string, alone or in a list, is a 400 naming where it is."""
        assert "empty string" in bad_request(client, model="tiny-embed", input="").message
        assert "input[1]" in bad_request(client, model="tiny-embed", input=["a", ""]).message

    def test_items_that_are_not_strings_are_refused(self, client):
        """A list mixing strings with anything else is a 400 naming the item."""
        error = bad_request(client, model="tiny-embed", input=["hello", 3, "world"])
        assert "input[1] must be a string" in error.message
        error = bad_request(client, model="tiny-embed", input=[{"text": "hello"}])
        assert "input[0] must be a string" in error.message

    def test_too_many_inputs_are_refused_naming_the_limit(self, client):
        """More inputs than one request may carry is a 400 that says the limit."""
        error = bad_request(client, model="tiny-embed", input=["hi"] * 2049)
        assert "2049 items; at most 2048" in error.message

    def test_an_input_over_the_context_is_refused_not_truncated(self, client):
        """An input of more tokens than the model embeds is a 400 naming the input, its
        length and the limit; nothing is truncated."""
        error = bad_request(client, model="tiny-embed", input=["hello", "hello " * 600])
        assert error.code == "context_length_exceeded"
        assert "input[1] is 602 tokens" in error.message
        assert "at most 512 tokens" in error.message

    def test_a_lone_surrogate_is_refused_at_the_door(self, agent):
        """Text that is not valid Unicode is a 400 that names the input."""
        raw = '{"model": "tiny-embed", "input": ["ok", "bad \\ud800 text"]}'
        status, body = agent.request("POST", "/v1/embeddings", json.loads(raw))
        assert status == 400
        assert body["error"]["param"] == "input[1]"
        assert "lone UTF-16 surrogate" in body["error"]["message"]

    def test_a_token_id_outside_the_vocabulary_is_refused(self, client):
        """A token array is checked against the vocabulary before llama.cpp reads it."""
        _, tokens = gguf_facts(TINY_EMBED)
        error = bad_request(client, model="tiny-embed", input=[[101, len(tokens), 102]])
        assert f"token id {len(tokens)}" in error.message

    def test_other_dimensions_are_refused_naming_the_models(self, client):
        """A model cannot shorten its vectors: other ``dimensions`` are a 400 that says the
        length it has."""
        n_embd, _ = gguf_facts(TINY_EMBED)
        error = bad_request(client, model="tiny-embed", input="hello", dimensions=8)
        assert f"returns {n_embd}-dimensional vectors" in error.message

    def test_an_unknown_encoding_is_refused(self, agent):
        """Only float and base64 exist."""
        body = {"model": "tiny-embed", "input": "hi", "encoding_format": "int8"}
        status, answer = agent.request("POST", "/v1/embeddings", body)
        assert status == 400
        assert answer["error"]["param"] == "encoding_format"

    def test_embeddings_from_a_generation_model_are_refused(self, client):
        """The chat model is named on the embeddings route: a 400 that says what it is and
        which model embeds."""
        error = bad_request(client, model="tiny-llama", input="hello")
        assert error.code == "wrong_model_role"
        assert "generation model" in error.message
        assert "'tiny-embed'" in error.message

    def test_a_chat_with_the_embedding_model_is_refused(self, client):
        """The embedding model is named on the chat and completion routes: a 400 that says
        it serves /v1/embeddings."""
        with pytest.raises(openai.BadRequestError) as chat:
            client.chat.completions.create(
                model="tiny-embed", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
        assert chat.value.code == "wrong_model_role"
        with pytest.raises(openai.BadRequestError) as completion:
            client.completions.create(model="tiny-embed", max_tokens=4, prompt="hi")
        assert "serves /v1/embeddings" in completion.value.message

    def test_an_unknown_model_is_not_found(self, client):
        """A model nobody serves is a 404 that names the one that embeds here."""
        with pytest.raises(openai.NotFoundError) as caught:
            client.embeddings.create(model="nomic-embed", input="hello")
        assert "tiny-embed" in caught.value.message

    def test_the_agent_still_serves_after_bad_input(self, client):
        """After every refusal above, a good request is answered."""
        assert vectors(client, "still here").shape[0] == 1


class TestEmbeddingModelSetting:
    def test_an_installed_model_is_served_by_name_and_pinned(self, short_tmp):
        """``embedding_model`` may name a model imported with ``--role embedding``; the
        agent pins it, so a gc never removes it from under the loaded model."""
        state = short_tmp / "state"
        imported = subprocess.run(
            [sys.executable, "-m", "edgelm_cli", "models", "import", str(TINY_EMBED),
             "--role", "embedding", "--state-dir", str(state), "--json"],
            capture_output=True, text=True, check=True, cwd=REPO,
        )  # fmt: skip
        assert json.loads(imported.stdout)["role"] == "embedding"
        served = start(short_tmp, "tiny-embed")
        try:
            client = OpenAI(base_url=served.base_url + "/v1", api_key="x", max_retries=0)
            assert len(client.embeddings.create(model="tiny-embed", input="hi").data) == 1
            status, registry = served.request("GET", "/v1/registry/models")
            assert status == 200
            (embed,) = [m for m in registry["models"] if m["name"] == "tiny-embed"]
            assert embed["pinned"]
            assert embed["role"] == "embedding"
            status, collected = served.request("POST", "/v1/registry/gc", {})
            assert status == 200
            assert embed["ref"] not in collected["removed"]
            status, verified = served.request(
                "POST", "/v1/registry/verify", {"model": embed["ref"]}
            )
            assert verified["ok"], verified
        finally:
            served.stop()

    def test_a_generation_model_as_embedding_model_fails_loudly_and_chat_serves(self, short_tmp):
        """Naming a chat model as the embedding model does not stop the agent: chat still
        serves, the log says why, and /v1/embeddings answers with the reason."""
        served = start(short_tmp, "tiny-llama")
        try:
            (failed,) = served.log_events("embedding_model_failed")
            assert "a generation model" in failed["error"]
            status, body = served.request(
                "POST", "/v1/embeddings", {"model": "tiny-embed", "input": "hi"}
            )
            assert status == 500
            assert body["error"]["code"] == "model_load_failed"
            assert "a generation model" in body["error"]["message"]
            chat = {"model": "tiny-llama", "max_tokens": 2, "prompt": "good"}
            assert served.request("POST", "/v1/completions", chat)[0] == 200
        finally:
            served.stop()

    def test_an_embedding_model_is_never_activated_as_the_chat_model(self, agent):
        """Activation refuses a model of role embedding, and the chat model keeps serving."""
        status, body = agent.request("POST", "/v1/registry/activate", {"model": "tiny-embed"})
        assert status == 422
        assert "embedding model" in body["error"]["message"]
        assert agent.request("GET", "/readyz")[1]["model"] == "tiny-llama"

    def test_a_version_keeps_its_role(self, short_tmp):
        """The same file imported again as the other role, under the same version, is
        refused: a signed version never changes."""
        state = str(short_tmp / "state")
        command = [sys.executable, "-m", "edgelm_cli", "models", "import", str(TINY_EMBED),
                   "--state-dir", state, "--version", "1", "--json"]  # fmt: skip
        subprocess.run([*command, "--role", "embedding"], check=True, capture_output=True, cwd=REPO)
        again = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        assert again.returncode != 0
        assert "tiny-embed@1 is already imported with role embedding" in (
            again.stdout + again.stderr
        )


def with_nan_token(path: Path, token_id: int) -> None:
    """Overwrite one row of the model's token embeddings with NaN, in place: an input holding
    that token gets a NaN vector, as broken weights give, while text never reaches it."""
    reader = GGUFReader(path, "r+")
    [embeddings] = [t for t in reader.tensors if t.name == "token_embd.weight"]
    embeddings.data[token_id] = np.nan
    reader.data.flush()


class TestNonFiniteVectors:
    def test_a_nan_vector_is_a_500_naming_the_model_and_the_agent_serves_on(self, short_tmp):
        """A vector holding NaN is never written out (JSON has no NaN, and base64 would
        carry it into a search index): 500 backend_error naming the model and the broken
        input, not its batch-mate, in either encoding; other inputs are still embedded."""
        broken = short_tmp / "nan-embed.gguf"
        shutil.copy(TINY_EMBED, broken)
        _, tokens = gguf_facts(TINY_EMBED)
        unused = tokens.index("\u2581[unused5]")  # no text tokenizes to it
        with_nan_token(broken, unused)
        served = start(short_tmp, str(broken))
        try:
            cls, sep = tokens.index("[CLS]"), tokens.index("[SEP]")
            for encoding in ("float", "base64"):
                body = {
                    "model": "nan-embed",
                    "input": [[cls, sep], [cls, unused, sep]],
                    "encoding_format": encoding,
                }
                status, answer = served.request("POST", "/v1/embeddings", body)
                assert status == 500, answer
                assert answer["error"]["code"] == "backend_error"
                assert "model 'nan-embed'" in answer["error"]["message"]
                assert "input[1]" in answer["error"]["message"]
                assert "input[0]" not in answer["error"]["message"]  # its batch-mate is fine
            client = OpenAI(base_url=served.base_url + "/v1", api_key="x", max_retries=0)
            vector = client.embeddings.create(model="nan-embed", input="hello").data[0]
            assert np.isfinite(vector.embedding).all()
        finally:
            served.stop()


@pytest.mark.skipif(
    not MINILM.is_file(), reason="all-MiniLM-L6-v2 is not fetched (make embedding-model)"
)
class TestRealModel:
    def test_similar_sentences_score_higher_than_unrelated_ones(self, short_tmp):
        """On all-MiniLM-L6-v2, two sentences that mean nearly the same are closer than
        either is to an unrelated one, and vectors are 384 long as the model says."""
        served = start(short_tmp, str(MINILM))
        try:
            client = OpenAI(base_url=served.base_url + "/v1", api_key="x", max_retries=0)
            name = served.log_events("embedding_model_loaded")[0]["model"].split("@")[0]
            texts = [
                "How do I reset the coffee machine?",
                "What are the steps to restart the espresso maker?",
                "The quarterly earnings report is due on Friday.",
            ]
            response = client.embeddings.create(model=name, input=texts)
            v = np.array([d.embedding for d in response.data])
            assert v.shape == (3, gguf_facts(MINILM)[0]) == (3, 384)
            similar, unrelated_a, unrelated_b = v[0] @ v[1], v[0] @ v[2], v[1] @ v[2]
            assert similar > 0.5
            assert similar > unrelated_a + 0.3
            assert similar > unrelated_b + 0.3
        finally:
            served.stop()
