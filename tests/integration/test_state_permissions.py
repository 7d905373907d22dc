"""Nothing the agent keeps is readable by other local users: fresh, upgraded, or behind a link.

Against a real agent: its state directory is walked after a start, an old install's looser
modes are tightened at the next start, and a state directory that is a symbolic link (a data
partition, often, on devices) is tightened where it points.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_process import TINY_GGUF, AgentProcess


def modes(root: Path) -> dict[Path, int]:
    """Every path under ``root`` (itself included) with its permission bits; links are not
    followed."""
    found = {root: stat.S_IMODE(root.lstat().st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            try:
                st = path.lstat()
            except FileNotFoundError:  # a temporary file the running agent just renamed
                continue
            if not stat.S_ISLNK(st.st_mode):
                found[path] = stat.S_IMODE(st.st_mode)
    return found


def assert_closed_to_others(state: Path) -> None:
    """No path grants others anything; the database and its WAL are 0640; the keys private."""
    found = modes(state)
    open_to_others = {str(p.relative_to(state)): oct(m) for p, m in found.items() if m & 0o007}
    assert open_to_others == {}
    assert found[state] == 0o750
    assert found[state / "agent.db"] == 0o640
    assert found[state / "agent.db-wal"] == 0o640
    keys = state / "registry" / "local-keys"
    assert found[keys] == 0o700
    assert {found[k] for k in keys.iterdir()} == {0o600}


def open_up(root: Path) -> None:
    """Give every folder 0755 and every file 0644, as an agent from before the fix did."""
    for path in modes(root):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


class TestStateDirectory:
    def test_a_fresh_start_leaves_nothing_readable_by_others(self, start_agent) -> None:
        """After a first start with a model, no file or folder under the state directory is
        readable by others, and the database and its WAL are 0640."""
        agent = start_agent()
        assert_closed_to_others(agent.workdir / "state")

    def test_an_old_open_tree_is_tightened_at_the_next_start(self, start_agent) -> None:
        """A state directory an older agent left 0755/0644 is closed to others at the next
        start, and the log says what was tightened."""
        agent = start_agent()
        agent.stop()
        state = agent.workdir / "state"
        open_up(state)
        again = AgentProcess(agent.workdir, model=TINY_GGUF).wait_ready()
        try:
            assert_closed_to_others(state)
            tightened = {e["path"] for e in again.log_events("state_permissions_tightened")}
            assert str(state / "agent.db") in tightened
            assert str(state / "registry" / "state.json") in tightened
        finally:
            again.stop()

    def test_a_state_dir_that_is_a_link_is_tightened_where_it_points(self, short_tmp: Path) -> None:
        """A state directory given as a symbolic link (to a data partition) is tightened
        where it points, not skipped."""
        workdir = short_tmp / "linked"
        workdir.mkdir()
        real = short_tmp / "data"
        real.mkdir()
        os.chmod(real, 0o755)  # noqa: S103  # the looser mode of an old install, on purpose
        (workdir / "state").symlink_to(real, target_is_directory=True)
        agent = AgentProcess(workdir, model=TINY_GGUF).wait_ready()
        try:
            assert stat.S_IMODE(real.stat().st_mode) == 0o750
            assert_closed_to_others(real)
        finally:
            agent.stop()


_AS_NOBODY = """
import sys
from pathlib import Path
import structlog
from edgelm_agent.state_dir import prepare_state_dir
structlog.configure(processors=[structlog.processors.JSONRenderer()])
prepare_state_dir(Path(sys.argv[1]))
print("prepared")
"""
NOBODY = 65534


@pytest.fixture
def crossable_tmp() -> Iterator[Path]:
    """A folder any user can reach: pytest's tmp_path sits under a 0700 folder of root's."""
    outer = Path(tempfile.mkdtemp(prefix="edgelm-perm-", dir="/tmp"))
    outer.chmod(0o755)
    yield outer
    shutil.rmtree(outer, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
class TestSomeoneElsesFile:
    def test_a_file_the_agent_does_not_own_is_reported_and_the_start_goes_on(
        self, crossable_tmp: Path
    ) -> None:
        """A root-owned, world-readable file in the state directory cannot be closed by the
        agent's user: the start goes on with a warning naming it, the rest is tightened."""
        state = crossable_tmp / "state"
        (state / "inbox").mkdir(parents=True)
        ours = state / "inbox" / "notes.txt"
        ours.write_text("x")
        ours.chmod(0o644)
        theirs = state / "inbox" / "model.gguf"
        theirs.write_bytes(b"GGUF")
        theirs.chmod(0o644)
        for path in (state, state / "inbox", ours):
            os.chown(path, NOBODY, NOBODY)
        result = subprocess.run(
            [
                *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
                *(sys.executable, "-c", _AS_NOBODY, str(state)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert result.returncode == 0, result.stderr
        assert "prepared" in result.stdout
        assert '"event": "state_permissions_not_ours"' in result.stdout
        assert str(theirs) in result.stdout
        assert stat.S_IMODE(theirs.stat().st_mode) == 0o644  # not the agent's to change
        assert stat.S_IMODE(ours.stat().st_mode) == 0o640
        assert stat.S_IMODE(state.stat().st_mode) == 0o750
