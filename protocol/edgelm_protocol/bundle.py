"""The manifest that lets one signed hash cover a whole ONNX GenAI folder. Pure.

``bundle.json`` lists every file of the folder with its length and sha256. The manifest itself
is the TUF target, so its hash is signed; each member is then checked against the manifest.
Members travel and are stored by their hash, so no member name ever becomes a download URL or
a path outside the folder it is materialized into.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edgelm_protocol.errors import InvalidBundle, UnsafeTargetPath
from edgelm_protocol.targets import FILENAME_RE

MANIFEST_FORMAT = "edgelm-bundle/1"
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILES = 1000
MAX_DEPTH = 4
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, order=True)
class BundleFile:
    path: str  # relative, '/'-separated, checked by check_member_path
    length: int
    sha256: str


def check_member_path(path: str) -> str:
    parts = path.split("/") if isinstance(path, str) else []
    if (
        not parts
        or len(parts) > MAX_DEPTH
        or any(not FILENAME_RE.fullmatch(p) or ".." in p for p in parts)
    ):
        raise UnsafeTargetPath(f"bundle member {path!r} is not a safe relative path")
    return path


def build_manifest(files: list[BundleFile]) -> bytes:
    """Canonical bytes: the same folder always gives the same manifest and hash."""
    for f in files:
        check_member_path(f.path)
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        raise UnsafeTargetPath("bundle lists a file twice")
    body = {
        "format": MANIFEST_FORMAT,
        "files": [{"path": f.path, "length": f.length, "sha256": f.sha256} for f in sorted(files)],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse_manifest(raw: bytes) -> list[BundleFile]:
    """Parse verified manifest bytes; any inconsistency is a InvalidBundle or path error."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidBundle(f"bundle manifest is {len(raw)} bytes, over {MAX_MANIFEST_BYTES}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidBundle(f"bundle manifest is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InvalidBundle(f"bundle manifest format must be {MANIFEST_FORMAT}")
    items = data.get("files")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_FILES:
        raise InvalidBundle(f"bundle manifest must list 1-{MAX_FILES} files")
    files = []
    for item in items:
        if not isinstance(item, dict):
            raise InvalidBundle("bundle manifest entry must be an object")
        length, sha256 = item.get("length"), item.get("sha256")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise InvalidBundle(f"bundle member {item.get('path')!r} has a bad length")
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise InvalidBundle(f"bundle member {item.get('path')!r} has a bad sha256")
        files.append(BundleFile(check_member_path(item.get("path", "")), length, sha256))
    if len({f.path for f in files}) != len(files):
        raise UnsafeTargetPath("bundle lists a file twice")
    return files
