"""onnxruntime-genai behind the :class:`~edgelm_agent.inference.backend.Backend` port.

An ONNX GenAI model is a folder: ``genai_config.json`` (runtime settings, context length, EOS
ids), the ONNX graph and weights, and the Hugging Face tokenizer files, whose
``tokenizer_config.json`` (or ``chat_template.jinja``) carries the chat template.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnxruntime_genai as og

from edgelm_agent.errors import InvalidRequest, ModelLoadError
from edgelm_agent.inference.special_text import plain_tokens, special_pattern
from edgelm_agent.inference.types import Acceleration, ModelInfo, OutputConstraint, SamplingParams

#: Whether this build of onnxruntime-genai has llguidance, which constrains output.
HAS_GUIDANCE = hasattr(og.GeneratorParams, "set_guidance")

PREFILL_SLICE = 512  # tokens appended per call; bounds how long a cancel waits during prefill


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _chat_template(path: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The folder's chat template, where onnxruntime-genai 0.18 looks for it and in its order:
    tokenizer_config.json, then chat_template.jinja (where transformers now saves it), then
    chat_template.json."""
    template = tokenizer_config.get("chat_template")
    if not template and (path / "chat_template.jinja").is_file():
        try:
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"cannot read {path / 'chat_template.jinja'}: {exc}") from exc
    if not template:
        template = _read_json(path / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) and template else None


def _token_text(value: Any) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _as_ids(value: Any) -> frozenset[int]:
    if isinstance(value, int):
        return frozenset({value})
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, int))
    return frozenset()


class OnnxGenaiBackend:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        info: ModelInfo,
        eos_ids: frozenset[int],
        add_bos: bool,
        bos_id: int | None,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._info = info
        self._eos_ids = eos_ids
        self._add_bos = add_bos
        self._bos_id = bos_id
        self._specials = special_pattern(info.special_texts)
        self._random = random.Random()

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        model_id: str,
        threads: int,
        context_length: int,
        provider: str = "cpu",
    ) -> OnnxGenaiBackend:
        genai_config = _read_json(path / "genai_config.json")
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        model_section = genai_config.get("model", {})
        try:
            config = og.Config(str(path))
            # The runtime would otherwise size its thread pool itself; the agent's `threads`
            # setting must hold for both runtimes.
            config.overlay(
                json.dumps(
                    {
                        "model": {
                            "decoder": {
                                "session_options": {
                                    "intra_op_num_threads": threads,
                                    "inter_op_num_threads": 1,
                                }
                            }
                        }
                    }
                )
            )
            # The agent's setting decides the execution provider, not the folder's config:
            # the same signed model runs on a Jetson's GPU and on a Pi's CPU.
            config.clear_providers()
            if provider != "cpu":
                config.append_provider(provider)
            model = og.Model(config)
            tokenizer = og.Tokenizer(model)
        except Exception as exc:  # the runtime raises bare RuntimeError/OSError variants
            raise ModelLoadError(
                f"onnxruntime-genai could not load {path} with execution provider {provider}: {exc}"
            ) from exc
        trained = int(model_section.get("context_length") or context_length)
        eos_ids = _as_ids(model_section.get("eos_token_id")) or frozenset(tokenizer.eos_token_ids)
        bos_id = model_section.get("bos_token_id")
        info = ModelInfo(
            model_id=model_id,
            path=str(path),
            format="onnx",
            backend="onnxruntime-genai",
            context_length=min(context_length, trained),
            chat_template=_chat_template(path, tokenizer_config),
            bos_token=_token_text(tokenizer_config.get("bos_token")),
            eos_token=_token_text(tokenizer_config.get("eos_token")),
            created=int(time.time()),
            special_texts=frozenset(_added_token_texts(path, tokenizer_config)),
            accelerator=Acceleration(gpu_offload=provider != "cpu", execution_provider=provider),
        )
        return cls(
            model,
            tokenizer,
            info,
            eos_ids,
            add_bos=bool(tokenizer_config.get("add_bos_token", False)),
            bos_id=bos_id if isinstance(bos_id, int) else None,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        # The runtime's tokenizer always reads special-token text; plain text is tokenized in
        # pieces cut inside every such text (see special_text.py).
        ids = self._encode(text) if special else plain_tokens(text, self._specials, self._encode)
        wants_bos = add_bos and self._add_bos and self._bos_id is not None
        if wants_bos and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)  # type: ignore[arg-type]  # wants_bos: not None
        return ids

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)] if text else []

    def check_constraint(self, constraint: OutputConstraint) -> None:
        if not HAS_GUIDANCE:
            raise InvalidRequest(
                f"model {self._info.model_id!r} runs on an onnxruntime-genai without guidance "
                f"support, so it cannot hold its reply to {constraint.description}",
                param="response_format",
            )
        if constraint.guidance is None:
            raise InvalidRequest(
                f"model {self._info.model_id!r} runs on onnxruntime-genai, whose constraints "
                "(llguidance) take JSON schemas and tools but not GBNF grammars; the "
                "'grammar' field needs a llama.cpp (GGUF) model",
                param="grammar",
            )

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[str]:
        search: dict[str, Any] = {"max_length": len(prompt) + params.max_tokens}
        if params.temperature == 0:
            search["do_sample"] = False
        else:
            seed = params.seed if params.seed is not None else self._random.getrandbits(31)
            search.update(
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                random_seed=seed & 0x7FFFFFFF,
            )
            if params.top_k > 0:
                search["top_k"] = params.top_k
        gen_params = og.GeneratorParams(self._model)
        gen_params.set_search_options(**search)
        constraint = params.constraint
        if constraint is not None and constraint.guidance is not None:
            gen_params.set_guidance(*constraint.guidance)
        try:
            generator = og.Generator(self._model, gen_params)
        except RuntimeError as exc:
            if constraint is None or "grammar" not in str(exc):
                raise
            # llguidance compiles the constraint here and refuses what it cannot enforce.
            raise InvalidRequest(
                f"onnxruntime-genai cannot hold the reply to {constraint.description}: {exc}",
                param="response_format",
            ) from exc
        # The tokenizer stream holds back bytes of an unfinished UTF-8 character, so each
        # decoded piece is valid text.
        stream = self._tokenizer.create_stream()
        try:
            # The prompt goes in slices so a cancel is noticed during a long prefill too.
            for start in range(0, len(prompt), PREFILL_SLICE):
                if cancel.is_set():
                    return
                generator.append_tokens(list(prompt[start : start + PREFILL_SLICE]))
            while not generator.is_done():
                if cancel.is_set():
                    return
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if token in self._eos_ids:
                    return
                yield stream.decode(token)
        finally:
            del generator  # frees the KV cache now, not when the GC gets to it

    def close(self) -> None:
        self._tokenizer = None
        self._model = None


def _added_token_texts(path: Path, tokenizer_config: dict[str, Any]) -> set[str]:
    """The texts the tokenizer reads as single tokens: Hugging Face's added tokens."""
    texts = {
        entry.get("content", "")
        for entry in tokenizer_config.get("added_tokens_decoder", {}).values()
        if isinstance(entry, dict)
    }
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file():
        added = _read_json(tokenizer_file).get("added_tokens", [])
        texts |= {e.get("content", "") for e in added if isinstance(e, dict)}
    return {t for t in texts if isinstance(t, str) and t}
