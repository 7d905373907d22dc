"""The repository fleet-init writes verifies with python-tuf from the root it hands out.

The folder is served over real HTTP by a small aiohttp file server (what any web server or
mirror would do with ``control/repository``), and read by python-tuf's ngclient and by the
agent's own trust client, both starting from ``DIR/root.json``, the trust anchor every
enrollment bundle carries.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from tuf.api.exceptions import UnsignedMetadataError
from tuf.ngclient import Updater

from edgelm_agent.registry.clock import LastKnownGoodClock
from edgelm_agent.registry.trust import TrustClient
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet


@pytest.fixture
async def served(fleet_dir: FleetDir) -> AsyncIterator[str]:
    """control/repository served read-only over HTTP, as any web server would; yields its URL.

    Not ``add_static``: its 404 for a missing file is an empty chunked answer, and the agent's
    mirror fetcher returns a connection to its pool without reading the rest of an error
    answer, so the 404 ngclient gets when it looks for a newer root breaks the next request
    on that connection (reported to the agent's owner). The trust chain is what is tested
    here, so missing files get a plain 404, as the control plane's own routes give.
    """
    top = fleet_dir.paths.repository_dir.resolve()

    async def static_file(request: web.Request) -> web.Response:
        path = (top / request.match_info["path"]).resolve()
        if not path.is_relative_to(top) or not path.is_file():
            return web.Response(status=404, text="not found")
        return web.Response(body=path.read_bytes())

    app = web.Application()
    app.router.add_get("/repository/{path:.+}", static_file)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}/repository"
    await runner.cleanup()


def refresh(metadata_dir: Path, base_url: str, root: bytes) -> Updater:
    updater = Updater(str(metadata_dir), f"{base_url}/metadata/", bootstrap=root)
    updater.refresh()
    return updater


class TestFleetRepository:
    async def test_ngclient_verifies_the_new_repository_from_root_json(
        self, fleet_dir, served, tmp_path
    ):
        """ngclient walks timestamp, snapshot and targets from DIR/root.json without error."""
        root = fleet_dir.paths.root_json.read_bytes()
        updater = await asyncio.to_thread(refresh, tmp_path / "client", served, root)
        assert updater.get_targetinfo("models/none/1/model.gguf") is None  # empty, and verified
        assert (
            json.loads((tmp_path / "client" / "targets.json").read_bytes())["signed"]["targets"]
            == {}
        )

    async def test_root_json_is_the_repositorys_first_root(self, fleet_dir):
        """DIR/root.json is byte for byte the repository's 1.root.json."""
        first = fleet_dir.paths.repository_dir / "metadata" / "1.root.json"
        assert fleet_dir.paths.root_json.read_bytes() == first.read_bytes()

    async def test_the_agent_trusts_the_repository_through_its_own_client(
        self, fleet_dir, served, tmp_path
    ):
        """The agent's TrustClient, anchored on root.json, refreshes the fleet's repository."""
        client = TrustClient(
            tmp_path / "device" / "metadata",
            fleet_dir.paths.root_json.read_bytes(),
            [served],
            LastKnownGoodClock(tmp_path / "device" / "clock.json"),
        )
        assert await asyncio.to_thread(client.refresh) == {}

    async def test_another_fleets_root_does_not_verify_it(self, fleet_dir, served, tmp_path):
        """A root of another fleet (other keys) refuses this repository's metadata."""
        other = tmp_path / "other"
        init_fleet(
            other,
            fleet="other",
            control_url="http://127.0.0.1:8480",
            broker_url="mqtt://127.0.0.1:1883",
            now=0,
        )
        with pytest.raises(UnsignedMetadataError):
            await asyncio.to_thread(
                refresh, tmp_path / "client", served, (other / "root.json").read_bytes()
            )
