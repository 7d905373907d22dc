"""Which repository file a URL names: path checks before any file is touched.

Metadata names are one path segment of the TUF alphabet; target paths are segments of the
target alphabet with no ``..``; and the resolved file must lie inside its folder (a symlink
cannot lead out). Anything else is a 404, as a missing file is.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgelm_control.errors import NotFound

_METADATA_NAME = re.compile(r"(?:[0-9]{1,10}\.)?[a-z][a-z0-9_-]{0,63}\.json")
_TARGET_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_MAX_SEGMENTS = 8


class RepositoryFiles:
    def __init__(self, repository_dir: Path) -> None:
        self.metadata_dir = repository_dir / "metadata"
        self.targets_dir = repository_dir / "targets"

    def metadata_file(self, name: str) -> Path:
        if not _METADATA_NAME.fullmatch(name):
            raise NotFound(f"no metadata named {name!r}", param="path")
        return self._inside(self.metadata_dir, self.metadata_dir / name, name)

    def target_file(self, relative: str) -> Path:
        segments = relative.split("/")
        if len(segments) > _MAX_SEGMENTS or not all(
            _TARGET_SEGMENT.fullmatch(s) and ".." not in s for s in segments
        ):
            raise NotFound(f"no target file {relative!r}", param="path")
        return self._inside(self.targets_dir, self.targets_dir.joinpath(*segments), relative)

    @staticmethod
    def _inside(folder: Path, path: Path, shown: str) -> Path:
        try:
            resolved = path.resolve(strict=True)
            resolved.relative_to(folder.resolve(strict=True))
        except (FileNotFoundError, ValueError, OSError):
            raise NotFound(f"no repository file {shown!r}", param="path") from None
        if not resolved.is_file():
            raise NotFound(f"no repository file {shown!r}", param="path")
        return resolved
