"""``/repository/metadata/...`` and ``/repository/targets/...``: the TUF repository over HTTP.

No token: devices and mirrors fetch these, and TUF makes them safe to serve to anyone (a
client verifies every byte against signed metadata; a mirror can withhold, never substitute).
Blobs are served with :class:`aiohttp.web.FileResponse`, which answers Range requests, so an
interrupted download resumes where it stopped.
"""

from __future__ import annotations

from aiohttp import web

from edgelm_control.api.context import CONTEXT
from edgelm_control.api.operations import Operation, Param, Reply
from edgelm_control.api.schemas import ref
from edgelm_control.repository.files import RepositoryFiles

IMMUTABLE = "public, max-age=31536000, immutable"


def _files(request: web.Request) -> RepositoryFiles:
    return RepositoryFiles(request.app[CONTEXT].repository.repository_dir)


async def metadata(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = _files(request).metadata_file(name)
    # timestamp.json changes in place; versioned files never do.
    cache = "no-cache" if name == "timestamp.json" else IMMUTABLE
    return web.FileResponse(path, headers={"Cache-Control": cache})


async def target(request: web.Request) -> web.StreamResponse:
    path = _files(request).target_file(request.match_info["path"])
    return web.FileResponse(path, headers={"Cache-Control": IMMUTABLE})


NOT_FOUND = Reply("No such file.", ref("Error"))

OPERATIONS = (
    Operation(
        "GET",
        "/repository/metadata/{name}",
        metadata,
        "repositoryMetadata",
        "TUF metadata: timestamp.json, N.snapshot.json, N.targets.json, N.root.json.",
        {200: Reply("The signed metadata.", {"type": "object"}), 404: NOT_FOUND},
        params=(Param("name", "path", {"type": "string"}, "The metadata file name."),),
        public=True,
        tags=("repository",),
    ),
    Operation(
        "GET",
        "/repository/targets/{path}",
        target,
        "repositoryTarget",
        "A target blob by its consistent-snapshot name; Range requests resume downloads.",
        {
            200: Reply("The blob.", {"type": "string"}, "application/octet-stream"),
            206: Reply("Part of the blob (Range).", {"type": "string"}, "application/octet-stream"),
            404: NOT_FOUND,
        },
        params=(Param("path", "path", {"type": "string"}, "models/N/V/<sha256>.<file>"),),
        public=True,
        tags=("repository",),
        router_path="/repository/targets/{path:.+}",
    ),
)
