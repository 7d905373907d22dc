"""Pick the runtime from the model's format: a GGUF file or an ONNX GenAI folder.

The runtimes are optional extras, imported only when a model of their format is loaded, so a
device with only ``edgelm[llama]`` never imports onnxruntime and the other way round.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgelm_agent.errors import ModelLoadError
from edgelm_agent.inference.backend import Backend
from edgelm_agent.inference.types import Format

GGUF_MAGIC = b"GGUF"
ONNX_GENAI_CONFIG = "genai_config.json"


def detect_format(path: Path) -> Format:
    """Tell the format from the content, not from the name."""
    if path.is_dir():
        if (path / ONNX_GENAI_CONFIG).is_file():
            return "onnx"
        raise ModelLoadError(
            f"{path} is a folder without {ONNX_GENAI_CONFIG}; expected an ONNX GenAI model folder"
        )
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model {path} does not exist") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read model {path}: {exc.strerror}") from exc
    if magic == GGUF_MAGIC:
        return "gguf"
    raise ModelLoadError(
        f"{path} is neither a GGUF file (magic {GGUF_MAGIC!r}, found {magic!r}) nor an ONNX "
        "GenAI folder"
    )


def model_id_for(path: Path) -> str:
    """Default id: the file name without ``.gguf``, or the folder name."""
    return path.name.removesuffix(".gguf") if path.is_file() else path.name


def _require(module: str, message: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(message)


def load_backend(
    path: Path,
    *,
    threads: int,
    context_length: int,
    model_id: str | None = None,
    gpu_layers: int | None = None,
    onnx_provider: str = "cpu",
) -> Backend:
    """Load ``path`` with the runtime its format needs. Blocking: call it from a thread."""
    path = path.resolve()
    fmt = detect_format(path)
    model_id = model_id or model_id_for(path)
    if fmt == "gguf":
        _require("llama_cpp", "serving GGUF needs llama-cpp-python: pip install 'edgelm[llama]'")
        from edgelm_agent.inference.llama_backend import LlamaCppBackend

        return LlamaCppBackend.load(
            path,
            model_id=model_id,
            threads=threads,
            context_length=context_length,
            gpu_layers=gpu_layers,
        )
    _require(
        "onnxruntime_genai", "serving ONNX needs onnxruntime-genai: pip install 'edgelm[onnx]'"
    )
    from edgelm_agent.inference.onnx_backend import OnnxGenaiBackend

    return OnnxGenaiBackend.load(
        path,
        model_id=model_id,
        threads=threads,
        context_length=context_length,
        provider=onnx_provider,
    )
