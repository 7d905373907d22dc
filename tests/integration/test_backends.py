"""The two runtimes behind the Backend port, driven directly on the tiny models."""

from __future__ import annotations

import threading

import pytest

from edgelm_agent.errors import ModelLoadError
from edgelm_agent.inference.loader import detect_format, load_backend
from edgelm_agent.inference.types import SamplingParams
from tests.agent_process import TINY_GGUF, TINY_ONNX

GREEDY = SamplingParams(max_tokens=8, temperature=0)


def take(tokens, n: int) -> list[str]:
    out = []
    for piece in tokens:
        out.append(piece)
        if len(out) == n:
            break
    return out


class TestLlamaCpp:
    def test_cancel_interrupts_a_long_prompt(self):
        """A cancel during prompt evaluation aborts it and drops the half-written cache."""
        backend = load_backend(TINY_GGUF, threads=2, context_length=16384)
        prompt = backend.tokenize("hello " * 15000)[:15000]
        llm = backend._llm  # type: ignore[attr-defined]

        class CancelOnceFed(threading.Event):
            """Set as soon as the first 512-token batch is in: the cancel lands mid-prompt
            however the threads are scheduled."""

            def is_set(self) -> bool:
                return llm.n_tokens > 0 or super().is_set()

        out: list[str] = []
        worker = threading.Thread(
            target=lambda: out.extend(take(backend.generate(prompt, GREEDY, CancelOnceFed()), 8))
        )
        worker.start()
        worker.join(120)
        assert not worker.is_alive()
        assert out == []
        assert llm.n_tokens == 0  # aborted inside the prompt, not after it
        # and the model is fine for the next run
        assert (
            "".join(take(backend.generate(backend.tokenize("good"), GREEDY, threading.Event()), 8))
            == " bye"
        )
        backend.close()

    def test_seed_is_reproducible_at_the_edges(self):
        """Seeds that fold onto llama.cpp's 'random' sentinel stay deterministic."""
        backend = load_backend(TINY_GGUF, threads=2, context_length=512)
        prompt = backend.tokenize("hello")
        for seed in (-1, 2**32 - 1, 2**64 - 1, 7):
            params = SamplingParams(max_tokens=12, temperature=1.5, top_k=0, top_p=1.0, seed=seed)
            runs = [
                "".join(take(backend.generate(prompt, params, threading.Event()), 12))
                for _ in range(2)
            ]
            assert runs[0] == runs[1], seed
        backend.close()


class TestOnnxGenai:
    def test_greedy_is_deterministic_and_stops_at_eos(self):
        """Greedy output repeats exactly, and 'sea is' reaches the end-of-sequence token."""
        backend = load_backend(TINY_ONNX, threads=2, context_length=512)
        prompt = backend.tokenize("hello world")
        first = take(backend.generate(prompt, GREEDY, threading.Event()), 8)
        assert first == take(backend.generate(prompt, GREEDY, threading.Event()), 8)
        ended = list(
            backend.generate(
                backend.tokenize("sea is"),
                SamplingParams(max_tokens=400, temperature=0),
                threading.Event(),
            )
        )
        assert len(ended) < 400
        backend.close()


class TestLoader:
    def test_format_is_read_from_content(self, short_tmp):
        """A GGUF renamed .bin is still GGUF; a folder without genai_config.json is refused."""
        renamed = short_tmp / "model.bin"
        renamed.write_bytes(TINY_GGUF.read_bytes())
        assert detect_format(renamed) == "gguf"
        assert detect_format(TINY_ONNX) == "onnx"
        with pytest.raises(ModelLoadError, match=r"genai_config\.json"):
            detect_format(short_tmp)


class TestAcceleratorSettings:
    def test_gpu_layers_reach_llama_cpp(self):
        """The gpu_layers setting is what llama.cpp is given, and what the model reports."""
        backend = load_backend(TINY_GGUF, threads=2, context_length=256, gpu_layers=3)
        try:
            assert backend._llm.model_params.n_gpu_layers == 3  # type: ignore[attr-defined]
            assert backend.info.accelerator.gpu_layers == 3
            assert backend.info.accelerator.gpu_offload is False  # this machine's CPU build
        finally:
            backend.close()

    def test_gpu_layers_default_to_none_on_a_cpu_build(self):
        """Left unset, a build that cannot offload gets 0 layers: the CPU, said plainly."""
        backend = load_backend(TINY_GGUF, threads=2, context_length=256)
        try:
            assert backend._llm.model_params.n_gpu_layers == 0  # type: ignore[attr-defined]
            assert backend.info.accelerator.as_dict() == {"gpu_offload": False, "gpu_layers": 0}
        finally:
            backend.close()

    def test_an_onnx_provider_the_runtime_lacks_is_a_clear_load_error(self):
        """Asking a CPU-only onnxruntime-genai for CUDA fails at load, naming the provider."""
        with pytest.raises(ModelLoadError, match="execution provider cuda"):
            load_backend(TINY_ONNX, threads=2, context_length=256, onnx_provider="cuda")

    def test_the_cpu_provider_is_reported(self):
        """The ONNX model reports the provider it runs on."""
        backend = load_backend(TINY_ONNX, threads=2, context_length=256, onnx_provider="cpu")
        try:
            assert backend.info.accelerator.execution_provider == "cpu"
        finally:
            backend.close()
