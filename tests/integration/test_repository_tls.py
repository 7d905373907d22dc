"""TLS to the fleet's repository: the control plane serves HTTPS with the certificate
fleet-init issued, and an enrolled agent fetches metadata and models over https, verifying
the server against the fleet CA of its enrollment and nothing else.

Everything is real: the control plane as a subprocess on a real Mosquitto, an HTTPS file
server (aiohttp, in this process) for a repository with a model, the agent's own CLI as
subprocesses. A server whose certificate comes from another CA is refused, with an error that
says so.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edgelm_agent.enrollment import Enrollment, EnrollmentError
from edgelm_provisioning.enrollment import issue_device
from edgelm_provisioning.errors import ProvisioningError
from edgelm_provisioning.fleet_ca import CaPaths, FleetCa, issue_device_identity
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet
from edgelm_provisioning.repository_check import verify_repository
from tests.agent_process import REPO
from tests.fleet_harness import Director, Repository, bundle
from tests.integration.control.control_process import ControlProcess
from tests.mosquitto import Mosquitto, free_port

pytest_plugins = ("tests.mosquitto",)
pytestmark = pytest.mark.timeout(240)


def make_fleet(root: Path, control_url: str, broker_port: int = 1) -> FleetDir:
    init_fleet(
        root,
        fleet="acme",
        control_url=control_url,
        broker_url=f"mqtt://127.0.0.1:{broker_port}",
        now=int(time.time()),
    )
    return FleetDir.open(root)


async def edgelm(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """``edgelm ...`` as a subprocess (the event loop keeps serving meanwhile): exit status,
    the JSON it printed (or None) and its stderr."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "edgelm_cli", *map(str, args)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env=environment | (env or {}),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    try:
        data = json.loads(out)
    except ValueError:
        data = None
    assert proc.returncode is not None
    return proc.returncode, data, err.decode(errors="replace")


def server_context(paths: CaPaths) -> ssl.SSLContext:
    """The HTTPS identity fleet-init issued for the control plane (control/tls/server.pem)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths.control_server_cert, paths.control_server_key)
    return context


@pytest.fixture
async def https_files() -> AsyncIterator[Callable[[Path, ssl.SSLContext], Any]]:
    """Serve a folder over HTTPS (with Range requests) on a free port; all stopped after."""
    runners: list[web.AppRunner] = []

    async def serve(root: Path, context: ssl.SSLContext) -> str:
        app = web.Application()
        app.router.add_static("/", root)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
        return f"https://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


def device_bundle(path: Path, fleet: FleetDir, repository: Repository, url: str) -> Path:
    """A bundle for kiosk-1 with the fleet's TLS identity and ``url`` as its repository."""
    tls = issue_device_identity(FleetCa.load(fleet.paths.root), "kiosk-1", now=int(time.time()))
    return bundle(path, "kiosk-1", repository, Director(), 1, repository_url=url, tls=tls)


class TestAgentOverHttps:
    async def test_an_agent_refreshes_and_installs_over_https_with_the_fleet_certificate(
        self, short_tmp, https_files
    ):
        """The server presents the fleet's certificate: enrollment reaches the repository,
        and a model's metadata and blob come over https and install."""
        fleet = make_fleet(short_tmp / "fleet", "https://127.0.0.1:8443")
        repository = Repository(short_tmp)
        model = repository.add("tiny", "1.0")
        url = await https_files(repository.root, server_context(CaPaths(fleet.paths.root)))
        path = device_bundle(short_tmp / "kiosk-1.json", fleet, repository, url)
        state = short_tmp / "state"
        status, enrolled, err = await edgelm(
            "agent", "enroll", path, "--state-dir", state, "--json"
        )
        assert status == 0, err
        assert enrolled["repository_reachable"] is True
        status, installed, err = await edgelm(
            "models", "install", model.ref, "--state-dir", state, "--json"
        )
        assert status == 0, err
        assert (installed["name"], installed["version"]) == ("tiny", "1.0")

    async def test_a_server_with_a_certificate_from_another_ca_is_refused(
        self, short_tmp, https_files
    ):
        """Another fleet's certificate (valid for 127.0.0.1, just not ours): the repository is
        unreachable at enrollment, and an install fails naming the fleet CA, even when the
        system's trust store (SSL_CERT_FILE) trusts that other CA. The same server named as a
        site mirror, which is not the fleet's server, is verified against that store."""
        fleet = make_fleet(short_tmp / "fleet", "https://127.0.0.1:8443")
        other = make_fleet(short_tmp / "other", "https://127.0.0.1:8443")
        repository = Repository(short_tmp)
        model = repository.add("tiny", "1.0")
        url = await https_files(repository.root, server_context(CaPaths(other.paths.root)))
        path = device_bundle(short_tmp / "kiosk-1.json", fleet, repository, url)
        state = short_tmp / "state"
        status, enrolled, err = await edgelm(
            "agent", "enroll", path, "--state-dir", state, "--json"
        )
        assert status == 0, err
        assert enrolled["repository_reachable"] is False
        system = {"SSL_CERT_FILE": str(CaPaths(other.paths.root).ca_cert)}
        status, error, err = await edgelm(
            "models", "install", model.ref, "--state-dir", state, "--json", env=system
        )
        assert status != 0
        message = json.dumps(error) + err
        assert "does not verify against the fleet CA" in message
        assert "CERTIFICATE_VERIFY_FAILED" in message
        site_mirror = system | {"EDGELM_REPOSITORY_MIRRORS": url}
        status, installed, err = await edgelm(
            "models", "install", model.ref, "--state-dir", state, "--json", env=site_mirror
        )
        assert status == 0, err
        assert installed["name"] == "tiny"


class TestControlPlaneOverHttps:
    async def test_the_control_plane_serves_its_repository_over_https(
        self, short_tmp, mosquitto: Mosquitto
    ):
        """fleet-init with an https:// control URL writes http_tls_cert and http_tls_key; the
        control plane serves with them; a client trusting the fleet CA gets its repository,
        one trusting the system's store does not; an agent enrolled from a bundle of that
        fleet reaches the repository."""
        port = free_port()
        fleet = make_fleet(short_tmp / "fleet", f"https://127.0.0.1:{port}", mosquitto.port)
        control_toml = fleet.paths.control_toml.read_text()
        assert 'http_tls_cert = "tls/server.pem"' in control_toml
        process = ControlProcess(fleet.paths.control_toml, short_tmp / "control.log")
        try:
            process.wait_ready()
            assert process.url == f"https://127.0.0.1:{port}"
            trusted = ssl.create_default_context(cafile=str(CaPaths(fleet.paths.root).ca_cert))
            async with aiohttp.ClientSession() as session:
                timestamp = f"{process.url}/repository/metadata/timestamp.json"
                async with session.get(timestamp, ssl=trusted) as response:
                    assert response.status == 200
                    assert (await response.json())["signed"]["_type"] == "timestamp"
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await session.get(timestamp, ssl=ssl.create_default_context())
            path = short_tmp / "kiosk-1.json"
            issue_device(
                fleet,
                "kiosk-1",
                hardware_class="x86",
                labels=None,
                out=path,
                reissue=False,
                now=int(time.time()),
            )
            status, enrolled, err = await edgelm(
                "agent", "enroll", path, "--state-dir", short_tmp / "state", "--json"
            )
            assert status == 0, err
            assert enrolled["repository_reachable"] is True
            # The operator's CLI trusts its fleet directory's CA, with nothing in the
            # environment.
            status, devices, err = await edgelm(
                "fleet", "devices", "list", "--fleet-dir", fleet.paths.root, "--json"
            )
            assert status == 0, err
            assert isinstance(devices, dict)
            # ...and only that CA: another fleet's directory refuses this server, even with the
            # system's store trusting it, so the operator token is never sent to it.
            other = make_fleet(short_tmp / "other", process.url, mosquitto.port)
            system = {"SSL_CERT_FILE": str(CaPaths(fleet.paths.root).ca_cert)}
            token = fleet.paths.operator_token.read_text().strip()
            status, error, err = await edgelm(
                "fleet", "devices", "list", "--fleet-dir", other.paths.root,
                "--token", token, "--json", env=system,
            )  # fmt: skip
            assert status != 0
            assert "certificate" in (json.dumps(error) + err).lower()
            # The repository check before a push or a key publication trusts the same CA.
            verified = await asyncio.to_thread(verify_repository, fleet.paths, process.url)
            assert verified.timestamp_version >= 1
            with pytest.raises(ProvisioningError, match=r"(?i)certificate"):
                await asyncio.to_thread(verify_repository, other.paths, process.url)
        finally:
            process.terminate()


class TestPlainHttpIsRefused:
    @pytest.mark.parametrize(
        ("url", "refused"),
        [
            ("http://cp.example:8480/repository", True),
            ("http://10.0.0.5:8480/repository", True),
            ("http://127.0.0.1:8480/repository", False),
            ("http://localhost:8480/repository", False),
            ("https://cp.example:8443/repository", False),
        ],
    )
    def test_plain_http_off_loopback_is_refused_once_the_bundle_has_a_ca(
        self, short_tmp, url, refused
    ):
        """The repository's rule is the broker's: no plain http to another machine with a
        CA in the bundle; a bundle without a CA is not affected."""
        fleet = make_fleet(short_tmp / "fleet", "https://127.0.0.1:8443")
        repository = Repository(short_tmp)
        data = json.loads(device_bundle(short_tmp / "b.json", fleet, repository, url).read_text())
        if refused:
            with pytest.raises(EnrollmentError, match="must be https://"):
                Enrollment.from_bundle(data)
        else:
            assert Enrollment.from_bundle(data).repository_url == url
        without_ca = {k: v for k, v in data.items() if k != "tls"}
        assert Enrollment.from_bundle(without_ca).repository_url == url
