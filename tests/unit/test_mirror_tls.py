"""A pinned mirror keeps its CA through everything that handles mirror strings: joining a
subfolder, copying, pickling; and a CA file that cannot be loaded is a download error that
names it."""

from __future__ import annotations

import copy
import pickle
import time

import pytest
import urllib3

from edgelm_agent.registry.errors import DownloadError
from edgelm_agent.registry.mirrors import MirrorPools, PinnedMirror, subfolder
from edgelm_provisioning.fleet_init import init_fleet

NOW = int(time.time())


class TestPinnedMirror:
    def test_a_subfolder_of_a_pinned_mirror_stays_pinned(self, tmp_path):
        """targets/ of the fleet's repository is verified against the same CA."""
        mirror = PinnedMirror("https://cp.example:8443/repository", tmp_path / "ca.pem")
        targets = subfolder(mirror, "targets")
        assert targets == "https://cp.example:8443/repository/targets"
        assert isinstance(targets, PinnedMirror)
        assert targets.ca_file == tmp_path / "ca.pem"
        assert subfolder("https://mirror.example/repo/", "targets") == (
            "https://mirror.example/repo/targets"
        )
        assert subfolder("/media/usb/repo", "targets") == "/media/usb/repo/targets"

    def test_copies_and_pickles_keep_the_ca(self, tmp_path):
        """A frozen config copied or sent to another process keeps the pin."""
        mirror = PinnedMirror("https://cp.example/repository", tmp_path / "ca.pem")
        for clone in (copy.deepcopy(mirror), pickle.loads(pickle.dumps(mirror))):  # noqa: S301
            assert isinstance(clone, PinnedMirror)
            assert clone.ca_file == mirror.ca_file
            assert clone == mirror

    def test_only_https_can_be_pinned(self, tmp_path):
        """Pinning plain http would promise a verification that never happens."""
        with pytest.raises(ValueError, match="https://"):
            PinnedMirror("http://cp.example/repository", tmp_path / "ca.pem")

    def test_an_unreadable_ca_is_a_download_error_naming_it(self, tmp_path):
        """The fleet CA missing from the state directory: a clear error, no system store."""
        mirror = PinnedMirror("https://cp.example/repository", tmp_path / "missing.pem")
        with pytest.raises(DownloadError, match=r"cannot load the fleet CA .*missing\.pem"):
            MirrorPools().for_mirror(mirror)

    def test_plain_mirrors_share_the_default_pool_and_pinned_ones_get_their_own(self, tmp_path):
        """Unpinned mirrors use the pool given (the system's store); a pinned one a pool of
        its CA alone, one per CA file."""
        ca = tmp_path / "ca.pem"
        init_fleet(
            tmp_path / "fleet",
            fleet="acme",
            control_url="https://127.0.0.1:8443",
            broker_url="mqtts://127.0.0.1:8883",
            now=NOW,
        )
        ca.write_bytes((tmp_path / "fleet" / "tls" / "ca.pem").read_bytes())
        default = urllib3.PoolManager()
        pools = MirrorPools(default)
        assert pools.for_mirror("https://a.example") is default
        assert pools.for_mirror("http://b.example") is default
        pinned = pools.for_mirror(PinnedMirror("https://cp.example/repository", ca))
        assert pinned is not default
        assert pools.for_mirror(PinnedMirror("https://cp.example/repository/targets", ca)) is (
            pinned
        )
